"""Synth rendering: the DICOM files of a patient (:func:`render_patient`): headers with fake PHI,
pixel data from :mod:`pipeline.synth.phantoms` encoded in the series' transfer syntax, serialised
by :class:`_SeriesWriter` exactly as pydicom writes them, and the defect copies and junk files."""

from __future__ import annotations

import bisect
import logging
import struct
import zlib

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from pipeline.synth.phantoms import (
    ct_hu_volume,
    ct_series_pixels,
    dose_screen_pixels,
    proj_image,
    proj_vessel_thickness,
)
from pipeline.synth.planning import (
    S_EXTRAS,
    S_PIXELS,
    CTGeometry,
    PatientPlan,
    SeriesPlan,
    StudyPlan,
    rng,
    series_of,
    synth_uid,
)
from pipeline.synth.sites import Site

_OPENJPEG_LOG = logging.getLogger("openjpeg")

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
DX_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _ds(value: float, digits: int = 4) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def ct_pixel_spacing(site: Site) -> str:
    """PixelSpacing (one value: square pixels) of the site's CT images, as the header writes it."""
    return _ds(site.ct_fov / site.ct_matrix, 6)


def proj_pixel_spacing(site: Site) -> str:
    """PixelSpacing (one value: square pixels) of the site's radiographs at the patient plane (the
    ImagerPixelSpacing divided by the magnification), as the header writes it."""
    return _ds(site.proj_spacing / site.proj_magnification, 6)


def _add_seconds(hhmmss: str, seconds: int) -> str:
    total = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + seconds
    total = min(total, 24 * 3600 - 1)
    return f"{total // 3600:02d}{total // 60 % 60:02d}{total % 60:02d}"


def _file_meta(sop_class: UID, sop_uid: str, ts: UID, site: Site) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = synth_uid(0, "implementation", site.code)
    meta.ImplementationVersionName = site.implementation_version
    meta.SourceApplicationEntityTitle = site.source_ae
    return meta


def _patient_study_header(ds: Dataset, pt: PatientPlan, st: StudyPlan, seed: int) -> None:
    site = pt.site
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = st.date.strftime("%Y%m%d")
    ds.StudyDate = st.date.strftime("%Y%m%d")
    ds.StudyTime = st.time
    ds.AccessionNumber = st.accession
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = site.institution_address
    ds.ReferringPhysicianName = st.referring
    ds.StudyDescription = st.description
    ds.OperatorsName = st.operator
    ds.PatientName = pt.name
    ds.PatientID = pt.mrn
    ds.IssuerOfPatientID = site.issuer
    ds.PatientBirthDate = pt.birth.strftime("%Y%m%d")
    ds.PatientSex = pt.sex
    if pt.other_names:
        ds.OtherPatientNames = pt.other_names
    ds.PatientAge = st.age
    ds.PatientAddress = pt.address
    ds.PatientTelephoneNumbers = pt.phone
    ds.StudyInstanceUID = st.uid
    ds.StudyID = st.study_id


def _equipment_header(ds: Dataset, pt: PatientPlan, st: StudyPlan, seed: int) -> None:
    site = pt.site
    ds.Manufacturer = site.manufacturer
    ds.ManufacturerModelName = site.ct_model if st.kind == "ct" else site.proj_model
    ds.StationName = f"{site.station_prefix}{'CT' if st.kind == 'ct' else 'XR'}{1 + (pt.index + st.index) % 2:02d}"
    serial_base = {"A": 40311, "B": 72208, "C": 15574, "D": 98016}[site.code]
    ds.DeviceSerialNumber = f"SN{serial_base}{'7' if st.kind == 'ct' else '3'}{1 + (pt.index + st.index) % 2}"
    ds.SoftwareVersions = site.software


def _private_block(ds: Dataset, pt: PatientPlan, st: StudyPlan) -> None:
    block = ds.private_block(0x0019, pt.site.private_creator, create=True)
    block.add_new(0x10, "LO", pt.name)
    block.add_new(0x11, "LO", pt.mrn)
    block.add_new(0x12, "DS", _ds(st.ma * 0.01, 2))
    block.add_new(0x13, "LO", st.accession)


def _series_template(pt: PatientPlan, st: StudyPlan, se: SeriesPlan, seed: int) -> Dataset:
    """Header elements shared by every instance of a series (never per-instance ones)."""
    site = pt.site
    ds = Dataset()
    _patient_study_header(ds, pt, st, seed)
    _equipment_header(ds, pt, st, seed)
    series_time = _add_seconds(st.time, 60 * (se.index + 1))
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = st.date.strftime("%Y%m%d")
    ds.SeriesTime = series_time
    ds.InstanceCreationTime = series_time
    ds.SeriesInstanceUID = se.uid
    ds.SeriesNumber = se.number
    ds.SeriesDescription = se.description
    ds.BodyPartExamined = "CHEST"
    if se.kind == "sr":
        return ds
    ds.AcquisitionTime = _add_seconds(st.time, 60 * se.index + 20)
    ds.ContentTime = _add_seconds(series_time, 30)
    ds.ProtocolName = "CHEST ROUTINE" if st.kind == "ct" else "CHEST"
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.LossyImageCompression = "00"
    _private_block(ds, pt, st)
    if se.kind == "sc":
        ds.SOPClassUID = SECONDARY_CAPTURE_STORAGE
        ds.Modality = "CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
        ds.ConversionType = "WSD"
        ds.BurnedInAnnotation = "YES"
        ds.Rows, ds.Columns = 192, 256
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        return ds
    if st.kind == "ct":
        g = st.ct
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = st.for_uid
        ds.PositionReferenceIndicator = ""
        ds.ScanOptions = "HELICAL MODE"
        ds.KVP = st.kvp
        ds.XRayTubeCurrent = st.ma
        ds.ExposureTime = 600
        ds.Exposure = int(round(st.ma * 0.6))
        ds.CTDIvol = round(st.ma * 0.025, 2)
        ds.SliceThickness = _ds(site.ct_spacing)
        ds.SpacingBetweenSlices = _ds(site.ct_spacing)
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(site.ct_fov)
        ds.GantryDetectorTilt = _ds(g.tilt_deg, 1)
        ds.TableHeight = _ds(150.0 + g.table_y, 1)
        ds.RotationDirection = "CW"
        ds.FilterType = "BODY FILTER"
        ds.FocalSpots = "1.2"
        ds.ConvolutionKernel = site.ct_kernels[0 if se.kind == "ct_lung" else 1]
        ds.ImageOrientationPatient = _orientation(g)
        ds.Rows = ds.Columns = site.ct_matrix
        ps = ct_pixel_spacing(site)
        ds.PixelSpacing = [ps, ps]
        ds.BitsAllocated = 16
        ds.BitsStored = site.ct_bits_stored
        ds.HighBit = site.ct_bits_stored - 1
        ds.PixelRepresentation = site.ct_pixel_rep
        if se.kind == "ct_lung":
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        else:
            ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.WindowCenterWidthExplanation = "LUNG" if se.kind == "ct_lung" else "MEDIASTINUM"
        ds.RescaleIntercept = _ds(site.ct_intercept)
        ds.RescaleSlope = _ds(site.ct_slope)
        ds.RescaleType = "HU"
        return ds
    # projection radiography
    view = se.kind
    ds.Modality = site.proj_modality
    ds.SOPClassUID = DX_PRESENTATION_STORAGE if site.proj_modality == "DX" else CR_IMAGE_STORAGE
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = "PA" if view == "pa" else "LL"
    ds.PatientOrientation = ["L", "F"] if view == "pa" else ["P", "F"]
    ds.KVP = st.kvp
    ds.XRayTubeCurrent = st.ma
    ds.ExposureTime = 12 if view == "pa" else 25
    ds.Exposure = max(1, int(round(st.ma * (0.012 if view == "pa" else 0.025))))
    ds.DistanceSourceToDetector = "1800"
    ds.ImagerPixelSpacing = [_ds(site.proj_spacing), _ds(site.proj_spacing)]
    ds.PixelSpacing = [proj_pixel_spacing(site)] * 2
    ds.Rows, ds.Columns = site.proj_rows, site.proj_cols
    ds.PhotometricInterpretation = site.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = site.proj_bits
    ds.HighBit = site.proj_bits - 1
    ds.PixelRepresentation = 0
    top = (1 << site.proj_bits) - 1
    if site.proj_window:
        ds.WindowCenter = str(int(top * 0.47))
        ds.WindowWidth = str(int(top * 0.86))
    if site.proj_modality == "DX":
        ds.DistanceSourceToPatient = _ds(1800 / site.proj_magnification, 1)
        ds.EstimatedRadiographicMagnificationFactor = _ds(site.proj_magnification, 3)
        ds.DetectorType = "SCINTILLATOR"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.BurnedInAnnotation = "NO"
    else:
        ds.PlateType = "ST-VI"
        ds.Sensitivity = "200"
    return ds


def _sr_dataset(pt: PatientPlan, st: StudyPlan, se: SeriesPlan, seed: int) -> Dataset:
    ds = _series_template(pt, st, se, seed)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.Modality = "SR"
    ds.ContentDate = st.date.strftime("%Y%m%d")
    ds.ContentTime = _add_seconds(st.time, 900)
    ds.InstanceNumber = 1
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = Sequence([_code("113701", "DCM", "X-Ray Radiation Dose Report")])
    dlp = st.ma * 0.025 * st.ct.n_slices * pt.site.ct_spacing / 10 * 1.1
    texts = [
        f"Patient: {pt.name}  ID: {pt.mrn}  DOB: {pt.birth.strftime('%Y%m%d')}  Accession: {st.accession}",
        f"Exam: {st.description}  Operator: {st.operator}",
        f"CTDIvol {st.ma * 0.025:.1f} mGy (32 cm phantom); DLP {dlp:.1f} mGy*cm; {st.kvp} kV",
    ]
    items = []
    for text in texts:
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "TEXT"
        item.ConceptNameCodeSequence = Sequence([_code("121106", "DCM", "Comment")])
        item.TextValue = text
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _encode(arr: np.ndarray, ts: UID, bits_stored: int, pixel_rep: int, photometric: str) -> tuple[bytes, str]:
    """PixelData value and VR for ``arr`` in transfer syntax ``ts``."""
    if ts in (JPEG2000Lossless, RLELossless):
        from pydicom.pixels import get_encoder

        encoder = get_encoder(ts)
        plugin = "pylibjpeg" if "pylibjpeg" in encoder.available_plugins else ""
        level = _OPENJPEG_LOG.level
        _OPENJPEG_LOG.setLevel(logging.WARNING)  # it logs a line per encoded tile at INFO
        try:
            frame = encoder.encode(
                np.ascontiguousarray(arr), encoding_plugin=plugin, rows=arr.shape[0], columns=arr.shape[1],
                number_of_frames=1, samples_per_pixel=1, bits_allocated=arr.dtype.itemsize * 8,
                bits_stored=bits_stored, pixel_representation=pixel_rep, photometric_interpretation=photometric,
            )
        finally:
            _OPENJPEG_LOG.setLevel(level)
        return encapsulate([frame]), "OB"
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return data, "OB" if arr.dtype.itemsize == 1 else "OW"


class _SeriesWriter:
    """Serialises the instances of one series as ``Dataset.save_as(enforce_file_format=True)`` does,
    but encodes the template's elements only once: they are cut into tag-ordered segments around the
    per-instance elements (SOP Instance UID, Instance Number, position, pixel data), so each further
    instance costs only its own few elements. ``tests/pipeline/test_synth.py`` checks the bytes are
    identical to pydicom's own writer."""

    def __init__(self, template: Dataset, site: Site, sop_class: UID, ts: UID):
        self.template = template
        self.site = site
        self.sop_class = sop_class
        self.ts = UID(ts)
        self.implicit = self.ts == ImplicitVRLittleEndian
        self.charset = template.get("SpecificCharacterSet", "ISO_IR 100")
        self._key: tuple | None = None
        self._segments: list[bytes] = []
        self._meta_segments: tuple[bytes, bytes] | None = None

    def _encode(self, ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = self.implicit, True
        write_dataset(fp, ds, parent_encoding=self.charset)
        return fp.getvalue()

    def _element(self, elem: DataElement, implicit: bool | None = None) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = (self.implicit if implicit is None else implicit), True
        write_data_element(fp, elem, self.charset)
        return fp.getvalue()

    def instance(self, sop_uid: str, per_instance: dict, pixels: tuple[bytes, str] | None) -> tuple[bytes, int]:
        """File bytes of one instance, and the length of its pixel data value (0 without pixels)."""
        elems = [DataElement(0x00080018, "UI", sop_uid)]
        for keyword, value in per_instance.items():
            tag = tag_for_keyword(keyword)
            elems.append(DataElement(tag, dictionary_VR(tag), value))
        pixel_len = 0
        if pixels is not None:
            value, vr = pixels
            elems.append(DataElement(0x7FE00010, vr, value, is_undefined_length=self.ts.is_compressed))
            pixel_len = len(value)
        elems.sort(key=lambda e: e.tag)
        tags = tuple(e.tag for e in elems)
        if self._key != tags:
            overlap = set(tags) & set(self.template.keys())
            if overlap:
                raise ValueError(f"per-instance elements {sorted(overlap)} also in the series template")
            groups: list[list] = [[] for _ in range(len(tags) + 1)]
            for tag in sorted(self.template.keys()):
                groups[bisect.bisect(tags, tag)].append(tag)
            self._segments = [self._encode(Dataset({t: self.template[t] for t in group})) for group in groups]
            self._key = tags
        parts = [self._segments[0]]
        for elem, segment in zip(elems, self._segments[1:]):
            parts.append(self._element(elem))
            parts.append(segment)
        body = b"".join(parts)
        if self.ts == DeflatedExplicitVRLittleEndian:
            compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body = compressor.compress(body) + compressor.flush()
            if len(body) % 2:
                body += b"\x00"
        return _PREAMBLE + self._meta(sop_uid) + body, pixel_len

    def _meta(self, sop_uid: str) -> bytes:
        """File Meta Information: group length + elements, only the SOP instance UID varies."""
        if self._meta_segments is None:
            meta = _file_meta(self.sop_class, "1.2", self.ts, self.site)
            validate_file_meta(meta, enforce_standard=True)  # adds (0002,0001) etc. as pydicom's writer does
            before = Dataset({t: meta[t] for t in meta.keys() if 0x00020000 < t < 0x00020003})
            after = Dataset({t: meta[t] for t in meta.keys() if t > 0x00020003})
            self._meta_segments = (self._encode_meta(before), self._encode_meta(after))
        uid = self._element(DataElement(0x00020003, "UI", sop_uid), implicit=False)
        elements = self._meta_segments[0] + uid + self._meta_segments[1]
        group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elements))
        return group_length + elements

    @staticmethod
    def _encode_meta(ds: Dataset) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = False, True
        write_dataset(fp, ds)
        return fp.getvalue()


def instance_uid(seed: int, pt: PatientPlan, st: StudyPlan, se: SeriesPlan, k: int) -> str:
    """SOP Instance UID of instance ``k`` (CT: position index) of a series."""
    return synth_uid(seed, pt.index, st.index, se.index, k, "instance")


def _orientation(g: CTGeometry) -> list[str]:
    t = np.deg2rad(g.tilt_deg)
    return ["1", "0", "0", "0", _ds(np.cos(t), 10), _ds(np.sin(t), 10)]


def _slice_position(g: CTGeometry, site: Site, k: int) -> tuple[list[str], str]:
    """ImagePositionPatient and SliceLocation of the slice with position index ``k``: slices step
    along the normal of the (possibly tilted) image plane, centred on the table position."""
    orient = np.array([float(v) for v in _orientation(g)])
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    half = (site.ct_matrix - 1) / 2 * site.ct_fov / site.ct_matrix
    along = g.table_z + (k - (g.n_slices - 1) / 2) * site.ct_spacing
    centre = np.array([0.0, g.table_y, 0.0]) + along * normal
    position = centre - half * row_dir - half * col_dir
    return [_ds(v) for v in position], _ds(float(np.dot(position, normal)), 3)


def render_patient(pt: PatientPlan, seed: int, defects: bool) -> dict[str, bytes]:
    """All files of a patient: relpath (under the site folder) -> bytes."""
    site = pt.site
    out: dict[str, bytes] = {}
    cut: dict[str, int] = {}  # relpath -> length of its pixel data value (for the truncated copy)
    for st in pt.studies:
        hu = vessels = None
        if st.kind == "ct":
            hu = ct_hu_volume(st, site, rng(seed, S_PIXELS, pt.index, st.index, 99))
        for se in series_of(pt, st, seed, defects):
            base = f"{pt.folder}/{st.folder}/{se.folder}"
            r = rng(seed, S_PIXELS, pt.index, st.index, se.index)
            if se.kind == "sr":
                writer = _SeriesWriter(_sr_dataset(pt, st, se, seed), site, BASIC_TEXT_SR_STORAGE, se.ts)
                out[f"{base}/{se.names[0]}"], _ = writer.instance(instance_uid(seed, pt, st, se, 0), {}, None)
                continue
            template = _series_template(pt, st, se, seed)
            if se.kind in ("sc", "pa", "lat"):
                if se.kind == "sc":
                    sop_class = SECONDARY_CAPTURE_STORAGE
                    pix = _encode(dose_screen_pixels(pt, st), se.ts, 8, 0, "MONOCHROME2")
                else:
                    sop_class = DX_PRESENTATION_STORAGE if site.proj_modality == "DX" else CR_IMAGE_STORAGE
                    if vessels is None:
                        vessels = proj_vessel_thickness(st.proj, rng(seed, S_PIXELS, pt.index, st.index, 99),
                                                         (site.proj_rows, site.proj_cols), site.proj_spacing)
                    pix = _encode(proj_image(st, se.kind, site, r, vessels), se.ts, site.proj_bits, 0,
                                  site.photometric)
                rel = f"{base}/{se.names[0]}"
                writer = _SeriesWriter(template, site, sop_class, se.ts)
                out[rel], cut[rel] = writer.instance(instance_uid(seed, pt, st, se, 0), {"InstanceNumber": 1}, pix)
                continue
            # CT series: slices in position order
            stored = ct_series_pixels(hu, se.kind, st, site, r)
            writer = _SeriesWriter(template, site, CT_IMAGE_STORAGE, se.ts)
            for k in range(se.n):
                if defects and se.omit == k:
                    continue
                position, location = _slice_position(st.ct, site, k)
                per = {
                    "InstanceNumber": se.instance_numbers[k],
                    "ImagePositionPatient": position,
                    "SliceLocation": location,
                }
                pix = _encode(stored[k], se.ts, site.ct_bits_stored, site.ct_pixel_rep, "MONOCHROME2")
                rel = f"{base}/{se.names[k]}"
                out[rel], cut[rel] = writer.instance(instance_uid(seed, pt, st, se, k), per, pix)
    if defects:
        for ex in pt.extras:
            if ex.kind == "junk":
                out[ex.rel] = _junk_bytes(ex.name, pt, seed)
                continue
            st = pt.studies[ex.study]
            se = st.series[ex.series]
            source = f"{pt.folder}/{st.folder}/{se.folder}/{se.names[ex.instance]}"
            if source not in out:  # the instance was the omitted slice: take a neighbour
                source = next(k for k in out if k.startswith(f"{pt.folder}/{st.folder}/{se.folder}/"))
            data = out[source]
            if ex.kind == "duplicate":
                out[ex.rel] = data
            else:  # truncated: cut in the middle of the pixel data value (the last element)
                out[ex.rel] = data[: len(data) - cut[source] // 2]
    return out


def _junk_bytes(name: str, pt: PatientPlan, seed: int) -> bytes:
    r = rng(seed, S_EXTRAS, pt.index, 7)
    if name == "Thumbs.db":  # an OLE compound file header, as Windows Explorer leaves behind
        header = (bytes.fromhex("D0CF11E0A1B11AE1") + bytes(16)
                  + bytes.fromhex("3E000300FEFF0900060000000000000000000000"))
        body = r.integers(0, 256, size=4096 - len(header), dtype=np.uint8).tobytes()
        return header + body
    return (
        "DICOM EXPORT\r\n\r\nThis folder was written by the PACS export tool.\r\n"
        "Open the images with a DICOM viewer; the files have no extension.\r\n"
        f"Export job {int(r.integers(10000, 99999))}\r\n"
    ).encode("ascii")
