"""A hostile input corpus for ingest: crafted files that plant PHI everywhere and try to hurt the run.

:func:`write_hostile_corpus` writes a tree under ``root`` and returns :class:`Planted`: every
identifier string planted (``phi``, for :func:`tests.phi_scan.scan_outputs`), every directory entry
with what ingest must make of it (``expected``: ``"ingested"``, a rejection category,
``"rejected"`` for any category, or ``"any"``: only accounted for), the datasets written, and a labels CSV (outside the tree, keyed by
study) that labels every image so that images are ingested rather than rejected as unlabelled.

What it plants (see :data:`CASES` for one line each):

* PHI in every place a file can hold it: the 128-byte preamble; file meta
  (SourceApplicationEntityTitle, Sending/ReceivingApplicationEntityTitle, SourcePresentationAddress,
  PrivateInformationCreatorUID + PrivateInformation); DataSetTrailingPadding; free text and
  identifier attributes that old removal lists miss (ReasonForVisit, RequestedProcedureComments,
  CommentsOnThePerformedProcedureStep, AdmissionID, DetectorID, AcquisitionDeviceProcessingDescription,
  ...); text in sequences (AcquisitionContextSequence/TextValue, RequestAttributesSequence,
  OtherPatientIDsSequence, a kept VOILUTSequence whose item holds a private block and an unknown tag);
  private blocks (LO, UN, SQ); unknown public tags in even groups (LO, UN); retired attributes
  (OtherPatientIDs, StudyComments); an overlay (group 6000) with text; an icon image, an encapsulated
  document and SR-style ContentSequence (PersonName, TextValue) with PHI; identifiers inside values a
  de-identifier keeps (Manufacturer, ManufacturerModelName, BodyPartExamined, ConvolutionKernel,
  WindowCenterWidthExplanation, LUTExplanation): these must be blanked;
* character sets: ISO_IR 100 (``MÜLLER^JÜRGEN``), ISO_IR 192 (Cyrillic, Greek), ISO 2022 IR 87
  (``Yamada^Tarou=山田^太郎=やまだ^たろう``), each with a name part inside a kept attribute, and a file
  whose SpecificCharacterSet lies (ISO_IR 100 declared over UTF-8 bytes);
* sequences nested 400 deep (a recursion bomb);
* malformed dates (dashed and dotted study dates, month 13, ``19xx0101`` birth date);
* size bombs: a 2 GB sparse file, a ~4 KB RLE file claiming 65535 x 65535 x 16 bits, a native file
  claiming 40000 frames of 512 x 512;
* special entries: a FIFO, a socket, unreadable file and directory (not as root), symlinks (dangling,
  loops, self, leaving the root absolute and relative, to directories inside and outside, to a file
  inside), a file name that is not UTF-8, names with commas/quotes/``=``, patient-named folders and
  non-ASCII names;
* the usual junk: a text file with PHI, an empty file, an image without PatientID, two files with
  one SOPInstanceUID and different pixels, a legacy file without preamble, a bogus transfer syntax.

The building blocks (:func:`base_instance`, :class:`Identity`, :func:`save`, :func:`lenient`,
:func:`encode_element`, :func:`insert_raw`) are shared with the hypothesis mutations of
tests/pipeline/test_hostile_properties.py.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import socket
import stat
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, UID, generate_uid

from tests.phi_scan import walk_elements

INGESTED = "ingested"
REJECTED = "rejected"  # any rejection category
ANY = "any"  # ingested or rejected, whichever: only that it is accounted for and leaks nothing
GB = 1024**3

#: even-group tags that pydicom's dictionary does not know (checked by the tests)
UNKNOWN_LO = Tag(0x0010, 0xABCD)
UNKNOWN_UN = Tag(0x0030, 0x0001)
UNKNOWN_GROUP = Tag(0x00E0, 0x0010)
PRIVATE_GROUP = 0x0009

SOP_CLASSES = {
    "DX": pydicom.uid.DigitalXRayImageStorageForPresentation,
    "CR": pydicom.uid.ComputedRadiographyImageStorage,
    "CT": pydicom.uid.CTImageStorage,
    "MR": pydicom.uid.MRImageStorage,
}


# --------------------------------------------------------------------------------------------------
# building blocks


@contextlib.contextmanager
def lenient() -> Iterator[None]:
    """pydicom neither warns nor raises about invalid values while hostile files are written."""
    settings = pydicom.config.settings
    old = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = old


@dataclass(frozen=True)
class Identity:
    """One fake person and the site around them; every value is planted PHI."""

    patient_name: str
    patient_id: str
    accession: str = ""
    birth_date: str = ""
    other_ids: str = ""
    referring: str = ""
    operator: str = ""
    performing: str = ""
    institution: str = ""
    station: str = ""
    serial: str = ""
    detector: str = ""
    admission: str = ""
    address: str = ""
    phone: str = ""

    def phi(self) -> set[str]:
        """Every value, and every name component of 4+ characters (2+ for non-ASCII)."""
        out = {v for v in vars(self).values() if v}
        for name in (self.patient_name, self.referring, self.operator, self.performing):
            for group in name.split("="):
                out.add(group)
                out.update(p for p in group.split("^") if len(p) >= 4 or (p and not p.isascii() and len(p) >= 2))
        return {s for s in out if s}

    def apply(self, ds: Dataset) -> Dataset:
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        pairs = [("AccessionNumber", self.accession), ("PatientBirthDate", self.birth_date),
                 ("OtherPatientIDs", self.other_ids), ("ReferringPhysicianName", self.referring),
                 ("OperatorsName", self.operator), ("PerformingPhysicianName", self.performing),
                 ("InstitutionName", self.institution), ("StationName", self.station),
                 ("DeviceSerialNumber", self.serial), ("DetectorID", self.detector),
                 ("AdmissionID", self.admission), ("PatientAddress", self.address),
                 ("PatientTelephoneNumbers", self.phone)]
        for keyword, value in pairs:
            if value:
                setattr(ds, keyword, value)
        return ds


def pixels(seed: int, rows: int = 16, cols: int = 16) -> np.ndarray:
    """A 12-bit test pattern (no ASCII digit runs in its bytes), different per seed."""
    base = np.arange(rows * cols, dtype=np.uint32).reshape(rows, cols) * 16 + seed * 7
    return (base % 4096).astype(np.uint16)


def base_instance(modality: str = "DX", *, seed: int = 0, transfer_syntax: str = ExplicitVRLittleEndian,
                  study: str | None = None, series: str | None = None, rows: int = 16, cols: int = 16) -> Dataset:
    """A small valid instance: 16 x 16 MONOCHROME2 uint16, UIDs set, the modality's basics."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID = SOP_CLASSES.get(modality, pydicom.uid.SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality in {"DX", "CR"}:
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.BodyPartExamined = "CHEST"
    if modality in {"CT", "MR"}:
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-5.6, -5.6, 0.0]
        ds.FrameOfReferenceUID = generate_uid()
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels(seed, rows, cols).tobytes()
    return ds


def dataset_bytes(ds: Dataset, *, preamble: bytes | None = None) -> bytes:
    """``ds`` as a DICOM file; ``preamble`` (any bytes, cut/padded to 128) replaces the zero one."""
    buffer = io.BytesIO()
    with lenient():
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if preamble is not None:
        data = preamble[:128].ljust(128, b" ") + data[128:]
    return data


def save(ds: Dataset, path: Path | bytes, *, preamble: bytes | None = None, data: bytes | None = None) -> bytes:
    """Write ``ds`` (or ``data``) to ``path`` (str/Path or bytes for names that are not UTF-8)."""
    data = dataset_bytes(ds, preamble=preamble) if data is None else data
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    return data


def without_meta(data: bytes) -> bytes:
    """The dataset of a DICOM file alone: no preamble, no ``DICM``, no group 2 (a legacy file)."""
    elements, _ = walk_elements(data)
    meta_end = max(e.end for e in elements if e.tag >> 16 == 0x0002 and e.depth == 0)
    return data[meta_end:]


def encode_element(tag: int, vr: str, value: bytes, *, explicit: bool = True) -> bytes:
    """Raw little-endian bytes of one element (value padded to even length unless it is odd on purpose)."""
    group, element = tag >> 16, tag & 0xFFFF
    if not explicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in {"OB", "OW", "OF", "SQ", "UT", "UN", "OD", "OL", "OV", "UC", "UR", "SV", "UV"}:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value) & 0xFFFF) + value


def insert_raw(data: bytes, raw: bytes, tag: int) -> bytes:
    """``raw`` (encoded elements) inserted into a file's top-level dataset in tag order."""
    elements, _ = walk_elements(data)
    top = [e for e in elements if e.depth == 0 and e.tag >> 16 != 0x0002]
    after = next((e.start for e in top if e.tag > tag), None)
    at = after if after is not None else (top[-1].end if top else len(data))
    return data[:at] + raw + data[at:]


def private_block(ds: Dataset, group: int, creator: str, values: dict[int, tuple[str, object]]) -> None:
    """A private creator at (group,0010) and its elements (group,10xx)."""
    ds.add(DataElement(Tag(group, 0x0010), "LO", creator))
    for offset, (vr, value) in values.items():
        ds.add(DataElement(Tag(group, 0x1000 | offset), vr, value))


def item(**attrs) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


# --------------------------------------------------------------------------------------------------
# the corpus


PATIENT_A = Identity(
    patient_name="MUSTERMANN^MAXIMILIAN", patient_id="MRN8842137", accession="ACC5512093", birth_date="19610417",
    other_ids="OTHID99731", referring="HAUSARZT^GERTRUD", operator="RADTECH^KONSTANZE",
    performing="SCHNITZLER^OTTOKAR", institution="Klinikum Kleinwaldstadt", station="CTROOM_KWS7",
    serial="SN-44X9-0071", detector="DET-KWS-5523", admission="ADM-0077312",
    address="Lindenallee 17, Kleinkrozingen", phone="+49-7633-555123")
PATIENT_B = Identity(patient_name="KOWALSKI^ZBIGNIEW", patient_id="PESEL7712019", accession="ACC7719920",
                     birth_date="19770301", institution="Szpital Wojewodzki Zamosc", operator="NOWAKOWSKA^JADWIGA")
PATIENT_LATIN1 = Identity(patient_name="MÜLLER^JÜRGEN", patient_id="MUE-44102", accession="ACC4410277",
                          referring="SCHÖNBERG^BÄRBEL", operator="GRÜNEWALD^SÖREN",
                          institution="Universitätsklinikum Würzburg")
PATIENT_UTF8 = Identity(patient_name="Иванова^Пелагея", patient_id="IVA-30917", accession="ACC3091744",
                        referring="Παπαδόπουλος^Νικόλαος", institution="Больница Сосновоборск")
PATIENT_JP = Identity(patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう", patient_id="JP-88120", accession="ACC8812055",
                      operator="Suzuki^Hanako=鈴木^花子=すずき^はなこ", institution="東京中央病院")
PATIENT_DATES = Identity(patient_name="DATUMFEHLER^HILDEGARD", patient_id="DAT-99817", accession="ACC9981703",
                         birth_date="19xx0101")
PATIENT_LEGACY = Identity(patient_name="ALTBESTAND^WALTRAUD", patient_id="LEG-55510", accession="ACC5551066")
PATIENT_DUP = Identity(patient_name="DOPPELGAENGER^ERWIN", patient_id="DUP-12093", accession="ACC1209311")
PATIENT_NAMES = Identity(patient_name="SONDERZEICHEN^FRIEDA", patient_id="ODD-60214", accession="ACC6021488")
PATIENT_JUNK = Identity(patient_name="OHNEKENNUNG^BRUNHILDE", patient_id="JNK-30381", accession="ACC3038199")
PATIENT_OUTSIDE = Identity(patient_name="GEHEIMNISVOLL^AUSSERHALB", patient_id="OUT-77123", accession="ACC7712300")
PATIENT_LIAR = Identity(patient_name="Ødegårdsen^Åsmund", patient_id="LIE-31337", accession="ACC3133702",
                        institution="Sykehuset Ørnebu")
PATIENT_DEEP = Identity(patient_name="TIEFGANG^SIEGLINDE", patient_id="DEEP-4000", accession="ACC4000400")
PATIENT_BOMB = Identity(patient_name="SPRENGSATZ^BERTHOLD", patient_id="BMB-40404", accession="ACC4040401")

#: per-location marker words: a leak report names the place that leaked
MARKERS = (
    "PHIPREAMBLE", "PHISRCAE", "PHISENDAE", "PHIRECVAE", "PHISRCURL", "PHIPRIVINFO", "PHITRAILPAD",
    "PHIREASONVISIT", "PHIREQCOMMENT", "PHIPPSCOMMENT", "PHIPPSDESC", "PHIIMGCOMMENT", "PHIPATCOMMENT",
    "PHIHISTORY", "PHIDEVPROC", "PHIREQREASON", "PHIDERIV", "PHIPROTOCOL", "PHISERIESDESC", "PHISTUDYDESC",
    "PHIACQCONTEXT", "PHIREQPROCID", "PHISCHEDSTEP", "PHIOTHERSEQID", "PHIPRIVSEQ", "PHIUNKNOWNSEQ",
    "PHIPRIVTOP", "PHIPRIVUN", "PHIPRIVSQ", "PHIUNKNOWNLO", "PHIUNKNOWNUN", "PHIUNKNOWNGRP", "PHISTUDYCOMMENT",
    "PHIOVERLAY", "PHIOVLDESC", "PHIPRIVCREATOR", "PHIOUTSIDE", "PHINOTES", "PHICONTENTCREATOR",
    "PHISTUDYID", "PHIREQPHYS", "PHIICON", "PHIENCAPDOC", "PHICONTENTSEQ", "PHIDEEPNEST", "PHIPIXTAIL",
)
#: UIDs planted where a de-identifier must drop or remap them
PLANTED_UIDS = ("1.2.999.8842137.1", "1.2.999.8842137.5", "1.2.999.8842137.9")


@dataclass
class Planted:
    """What :func:`write_hostile_corpus` wrote."""

    root: Path
    outside: Path
    labels_csv: Path
    phi: set[str] = field(default_factory=set)
    expected: dict[str, str] = field(default_factory=dict)  # relpath (os.fsdecode) -> INGESTED | category | REJECTED
    what: dict[str, str] = field(default_factory=dict)  # relpath -> one line on what it is
    sources: dict[str, Dataset] = field(default_factory=dict)  # relpath -> dataset written (images)
    study_labels: dict[str, str] = field(default_factory=dict)  # StudyInstanceUID -> label
    fifos: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # case -> why it was not planted
    bad_names: list[bytes] = field(default_factory=list)  # relpaths (bytes) that are not UTF-8
    huge: list[str] = field(default_factory=list)  # relpaths of sparse multi-GB files (never read them whole)
    file_phi: dict[str, set[str]] = field(default_factory=dict)  # relpath -> the identifiers planted in it

    def plant(self, relpath: str | bytes, expected: str, what: str, ds: Dataset | None = None,
              label: str | None = "normal", phi: set[str] = frozenset()) -> None:
        key = os.fsdecode(relpath)
        assert key not in self.expected, f"planted twice: {key}"
        self.expected[key] = expected
        self.what[key] = what
        self.phi |= set(phi)
        self.file_phi[key] = set(phi)
        if isinstance(relpath, bytes):
            self.bad_names.append(relpath)
        if ds is not None:
            self.sources[key] = ds
            self.phi |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
            if label is not None:
                self.study_labels[str(ds.StudyInstanceUID)] = label

    @property
    def relpaths(self) -> list[str]:
        return sorted(self.expected)

    def write_labels(self) -> Path:
        self.labels_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(self.labels_csv, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["study_instance_uid", "label"])
            writer.writerows(sorted(self.study_labels.items()))
        return self.labels_csv


def _phi_everywhere(ident: Identity, study: str, seed: int) -> tuple[Dataset, bytes]:
    """A DX carrying ``ident`` in every place a file can hold it (the one file with everything)."""
    ds = base_instance("DX", seed=seed, study=study)
    ident.apply(ds)
    ds.StudyDate, ds.SeriesDate, ds.ContentDate, ds.StudyTime = "20200110", "20200110", "20200110", "101500"
    ds.StudyID = "PHISTUDYID-8842"
    ds.PatientSex, ds.PatientAge = "M", "058Y"
    meta = ds.file_meta
    meta.SourceApplicationEntityTitle = "PHISRCAE_MUSTER"
    meta.SendingApplicationEntityTitle = "PHISENDAE_88421"
    meta.ReceivingApplicationEntityTitle = "PHIRECVAE_KWS7"
    meta.SourcePresentationAddress = "http://pacs.kleinwaldstadt.example/PHISRCURL/MRN8842137"
    meta.PrivateInformationCreatorUID = PLANTED_UIDS[0]
    meta.PrivateInformation = b"PHIPRIVINFO MUSTERMANN^MAXIMILIAN MRN8842137 "
    # free text and identifiers that removal lists tend to miss
    ds.ReasonForVisit = "PHIREASONVISIT fell at home, Mr Mustermann, see MRN8842137"
    ds.RequestedProcedureComments = "PHIREQCOMMENT call Dr HAUSARZT on +49-7633-555123"
    ds.CommentsOnThePerformedProcedureStep = "PHIPPSCOMMENT done by RADTECH^KONSTANZE"
    ds.PerformedProcedureStepDescription = "PHIPPSDESC chest for MUSTERMANN"
    ds.ImageComments = "PHIIMGCOMMENT patient MUSTERMANN MAXIMILIAN"
    ds.PatientComments = "PHIPATCOMMENT lives at Lindenallee 17"
    ds.AdditionalPatientHistory = "PHIHISTORY smoker, brother of MUSTERMANN^KARL-HEINZ"
    ds.AcquisitionDeviceProcessingDescription = "PHIDEVPROC MUSTERMANN"
    ds.ReasonForTheRequestedProcedure = "PHIREQREASON cough"
    ds.DerivationDescription = "PHIDERIV copy for Dr SCHNITZLER"
    ds.ProtocolName = "PHIPROTOCOL MUSTERMANN"
    ds.SeriesDescription = "PHISERIESDESC MUSTERMANN"
    ds.StudyDescription = "PHISTUDYDESC Thorax Mustermann"
    ds.ContentCreatorName = "PHICONTENTCREATOR^ANNELIESE"
    ds.RequestingPhysician = "PHIREQPHYS^WALBURGA"
    # sequences that are not on any keep-list
    context = item(TextValue="PHIACQCONTEXT MUSTERMANN MRN8842137")
    context.ConceptNameCodeSequence = Sequence([item(CodeValue="121106", CodingSchemeDesignator="DCM",
                                                     CodeMeaning="Comment")])
    private_block(context, 0x0029, "PHIPRIVCREATOR", {0x01: ("LO", "PHIPRIVSEQ MUSTERMANN")})
    ds.AcquisitionContextSequence = Sequence([context])
    ds.RequestAttributesSequence = Sequence([item(RequestedProcedureID="PHIREQPROCID-77",
                                                  ScheduledProcedureStepID="PHISCHEDSTEP-12",
                                                  AccessionNumber=ident.accession)])
    ds.ReferencedPatientSequence = Sequence([item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.1.1",
                                                  ReferencedSOPInstanceUID=PLANTED_UIDS[1])])
    ds.OtherPatientIDsSequence = Sequence([item(PatientID="PHIOTHERSEQID-4711", TypeOfPatientID="TEXT")])
    # a kept sequence whose item hides a private block, an unknown tag and an identifier in kept text
    voi = item(LUTDescriptor=[4, 0, 16], LUTExplanation="MAXIMILIAN preset")
    voi.add(DataElement(Tag(0x0028, 0x3006), "US", [0, 100, 200, 300]))  # LUTData
    private_block(voi, 0x0029, "PHIPRIVCREATOR", {0x02: ("LO", "PHIPRIVSEQ MRN8842137")})
    voi.add(DataElement(UNKNOWN_LO, "LO", "PHIUNKNOWNSEQ MUSTERMANN"))
    ds.VOILUTSequence = Sequence([voi])
    # private, unknown and retired attributes at the top level
    inner = Dataset()
    inner.add(DataElement(Tag(PRIVATE_GROUP, 0x0010), "LO", "PHIPRIVCREATOR"))
    inner.add(DataElement(Tag(PRIVATE_GROUP, 0x1001), "LO", "PHIPRIVSQ MUSTERMANN^MAXIMILIAN"))
    private_block(ds, PRIVATE_GROUP, "PHIPRIVCREATOR", {
        0x01: ("LO", "PHIPRIVTOP MUSTERMANN"),
        0x02: ("UN", b"PHIPRIVUN MRN8842137 "),
        0x03: ("SQ", Sequence([inner])),
        0x04: ("PN", "PHIPRIVTOP^MUSTERMANN"),
    })
    ds.add(DataElement(UNKNOWN_LO, "LO", "PHIUNKNOWNLO MUSTERMANN"))
    ds.add(DataElement(UNKNOWN_UN, "UN", b"PHIUNKNOWNUN MRN8842137 "))
    ds.add(DataElement(UNKNOWN_GROUP, "LO", "PHIUNKNOWNGRP MAXIMILIAN"))
    ds.StudyComments = "PHISTUDYCOMMENT Mustermann"  # retired
    # an overlay plane: its bits are burned-in-like text; its description is free text
    ds.add(DataElement(Tag(0x6000, 0x0010), "US", 16))
    ds.add(DataElement(Tag(0x6000, 0x0011), "US", 16))
    ds.add(DataElement(Tag(0x6000, 0x0022), "LO", "PHIOVLDESC MUSTERMANN"))
    ds.add(DataElement(Tag(0x6000, 0x0040), "CS", "G"))
    ds.add(DataElement(Tag(0x6000, 0x0050), "SS", [1, 1]))
    ds.add(DataElement(Tag(0x6000, 0x0100), "US", 1))
    ds.add(DataElement(Tag(0x6000, 0x0102), "US", 0))
    ds.add(DataElement(Tag(0x6000, 0x3000), "OW", b"PHIOVERLAY MUSTERMANN MRN8842137".ljust(32)))
    # identifiers inside values a de-identifier keeps: these must come out blank
    ds.Manufacturer = "KONSTANZE RADTECH Medical"  # the operator's name, in an LO
    ds.ManufacturerModelName = "Model MRN8842137"  # the patient ID
    ds.BodyPartExamined = "MUSTERMANN"  # the patient's family name, in a CS
    ds.ConvolutionKernel = "KLEINWALDSTADT"  # the institution
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.WindowCenterWidthExplanation = "HAUSARZT preset"  # the referring physician
    ds.ReferencedImageSequence = Sequence([item(ReferencedSOPClassUID=ds.SOPClassUID,
                                                ReferencedSOPInstanceUID=PLANTED_UIDS[2])])
    # a thumbnail (its pixels may show the name), an embedded document, SR-style content with a name
    icon = item(Rows=4, Columns=8, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=8,
                BitsStored=8, HighBit=7, PixelRepresentation=0)
    icon.PixelData = b"PHIICON MUSTERMANN MRN8842137 ..."[:32]
    ds.IconImageSequence = Sequence([icon])
    ds.EncapsulatedDocument = b"%PDF-1.4 PHIENCAPDOC Befund MUSTERMANN^MAXIMILIAN MRN8842137\n"
    ds.ContentSequence = Sequence([item(RelationshipType="CONTAINS", ValueType="PNAME",
                                        PersonName="PHICONTENTSEQ^MUSTERMANN"),
                                   item(RelationshipType="CONTAINS", ValueType="TEXT",
                                        TextValue="PHICONTENTSEQ seen by HAUSARZT")])
    ds.DataSetTrailingPadding = b"PHITRAILPAD MUSTERMANN^MAXIMILIAN MRN8842137 "
    preamble = b"PHIPREAMBLE MUSTERMANN^MAXIMILIAN MRN8842137 19610417 Klinikum Kleinwaldstadt"
    return ds, dataset_bytes(ds, preamble=preamble)


#: one line per kind of case in the corpus (what the test report lists)
CASES = {
    "phi_everywhere": "PHI in preamble, file meta, trailing padding, free text, sequences, private/unknown/retired "
                      "tags, overlay, and inside kept values (which must be blanked)",
    "second_study": "same patient, a later study with clean kept values (must survive; dates keep their interval)",
    "ct_series": "a 3-slice CT volume with geometry under a patient-named folder",
    "charset_latin1": "ISO_IR 100 names (MÜLLER^JÜRGEN), a name part in Manufacturer, a non-ASCII file name",
    "charset_utf8": "ISO_IR 192 Cyrillic and Greek names, a name in ManufacturerModelName",
    "charset_iso2022": "ISO 2022 IR 87 Japanese PN with ideographic and phonetic groups, 山田 in Manufacturer",
    "bad_dates": "StudyDate 2021-03-04, SeriesDate 20211399, AcquisitionDate 2021.03.05, birth date 19xx0101",
    "charset_lies": "SpecificCharacterSet ISO_IR 100 over UTF-8 bytes, a name part in Manufacturer",
    "deep_nesting": "VOILUTSequence nested 400 deep with identifiers in every item (must not crash the run)",
    "legacy": "no preamble, no file meta (implicit VR): ingested with a proper zero preamble",
    "huge_sparse": "a 2 GB sparse file (too_large before any read)",
    "rle_bomb": "4 KB of RLE claiming 65535 x 65535 x 16 bits (too_large before any decode)",
    "frames_bomb": "native data claiming 40000 frames of 512 x 512 (too_large)",
    "fifo": "a FIFO (special_file, must not block)",
    "socket": "a Unix socket (special_file)",
    "unreadable": "a file and a directory with mode 000 (unreadable; not planted when running as root)",
    "symlinks": "dangling, a->b->a loop, self loop, absolute and relative links leaving the root, links to "
                "directories inside and outside (symlink); a link to a file inside (read: a duplicate)",
    "bad_name": "a file name that is not UTF-8 (bad_name)",
    "odd_names": "names with comma, quotes, '=' and '|' (ingested; CSV-hostile)",
    "junk": "a text file with PHI and an empty file (not_dicom), an image without PatientID",
    "duplicates": "two files with one SOPInstanceUID and different pixels (duplicate, naming each other by file_id)",
    "bogus_syntax": "a file meta TransferSyntaxUID that is not a UID but holds an ID (rejected)",
    "pixel_tail": "native pixel data longer than Rows x Columns x bits declare, a name in the excess bytes "
                  "(ingested, the excess cut)",
}


def write_hostile_corpus(root: Path, *, outside: Path | None = None, labels_csv: Path | None = None,
                         big: bool = True) -> Planted:
    """Write the hostile corpus under ``root`` (created; must not exist or be empty).

    Args:
        root: the input tree.
        outside: a folder outside ``root`` for symlink targets (default ``root.parent / "outside"``).
        labels_csv: where the labels CSV goes (default ``root.parent / "labels.csv"``, outside the tree).
        big: also plant the 2 GB sparse file (costs no disk, but a reader that reads it whole costs 2 GB).
    """
    with lenient():
        return _write_corpus(Path(root), outside, labels_csv, big)


def _write_corpus(root: Path, outside: Path | None, labels_csv: Path | None, big: bool) -> Planted:
    root.mkdir(parents=True, exist_ok=True)
    outside = Path(outside) if outside is not None else root.parent / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    labels_csv = Path(labels_csv) if labels_csv else root.parent / "labels.csv"
    planted = Planted(root=root, outside=outside, labels_csv=labels_csv)
    planted.phi |= set(MARKERS) | set(PLANTED_UIDS)

    # -- patient A: PHI everywhere, and a clean second study ------------------------------------
    folder = "MUSTERMANN_MAXIMILIAN_MRN8842137"
    ds, data = _phi_everywhere(PATIENT_A, generate_uid(), seed=1)
    save(ds, root / folder / "phi_everywhere.dcm", data=data)
    planted.plant(f"{folder}/phi_everywhere.dcm", INGESTED, CASES["phi_everywhere"], ds, phi=PATIENT_A.phi())
    ds = base_instance("DX", seed=2)
    PATIENT_A.apply(ds)
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = "20200301", "20200301", "20200301"
    ds.PatientSex, ds.PatientAge, ds.PatientSize, ds.PatientWeight = "M", "058Y", "1.82", "91"
    ds.Manufacturer, ds.ManufacturerModelName, ds.KVP = "ACME Imaging", "XR-5000", "120"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    save(ds, root / folder / "second_study.dcm")
    planted.plant(f"{folder}/second_study.dcm", INGESTED, CASES["second_study"], ds, phi=PATIENT_A.phi())

    # -- patient B: a CT volume ------------------------------------------------------------------
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(3):
        ds = base_instance("CT", seed=10 + k, study=study, series=series)
        PATIENT_B.apply(ds)
        ds.FrameOfReferenceUID = frame
        ds.ImagePositionPatient = [-5.6, -5.6, 2.5 * k]
        ds.SliceLocation = 2.5 * k
        ds.InstanceNumber = k + 1
        ds.StudyDate = ds.SeriesDate = "20190512"
        ds.Manufacturer, ds.ConvolutionKernel = "ACME Imaging", "B30f"
        save(ds, root / "PESEL7712019_KOWALSKI" / "ct" / f"slice_{k:02d}.dcm")
        planted.plant(f"PESEL7712019_KOWALSKI/ct/slice_{k:02d}.dcm", INGESTED, CASES["ct_series"], ds,
                      phi=PATIENT_B.phi())

    # -- character sets ----------------------------------------------------------------------------
    ds = base_instance("CR", seed=20)
    ds.SpecificCharacterSet = "ISO_IR 100"
    PATIENT_LATIN1.apply(ds)
    ds.Manufacturer = "Jürgen Müller Medizintechnik"
    ds.StudyDescription = "Thorax Müller"
    ds.StudyDate = "20180707"
    save(ds, root / "charsets" / "MÜLLER_JÜRGEN.dcm")
    planted.plant("charsets/MÜLLER_JÜRGEN.dcm", INGESTED, CASES["charset_latin1"], ds, phi=PATIENT_LATIN1.phi())

    ds = base_instance("DX", seed=21)
    ds.SpecificCharacterSet = "ISO_IR 192"
    PATIENT_UTF8.apply(ds)
    ds.OtherPatientNames = "Ivanova^Pelageya"
    ds.ManufacturerModelName = "Иванова"
    ds.Manufacturer = "ACME Imaging"
    ds.StudyDate = "20170202"
    save(ds, root / "charsets" / "Иванова.dcm")
    planted.plant("charsets/Иванова.dcm", INGESTED, CASES["charset_utf8"], ds,
                  phi=PATIENT_UTF8.phi() | {"Ivanova^Pelageya", "Ivanova", "Pelageya"})
    utf8_relpath = "charsets/Иванова.dcm"

    ds = base_instance("DX", seed=22)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    PATIENT_JP.apply(ds)
    ds.Manufacturer = "山田"  # the patient's family name, ideographic
    ds.StudyDescription = "胸部 山田"
    ds.StudyDate = "20160606"
    save(ds, root / "charsets" / "山田_太郎.dcm")
    planted.plant("charsets/山田_太郎.dcm", INGESTED, CASES["charset_iso2022"], ds, phi=PATIENT_JP.phi())

    # a character set that lies: declared ISO_IR 100, the bytes are UTF-8
    ds = base_instance("DX", seed=23)
    ds.SpecificCharacterSet = "ISO_IR 192"
    PATIENT_LIAR.apply(ds)
    ds.Manufacturer = "Ødegårdsen Medical"
    ds.StudyDate = "20150505"
    data = dataset_bytes(ds)
    declared = b"CS\x0a\x00ISO_IR 192"
    assert declared in data
    data = data.replace(declared, b"CS\x0a\x00ISO_IR 100", 1)
    save(ds, root / "charsets" / "declared_latin1_is_utf8.dcm", data=data)
    planted.plant("charsets/declared_latin1_is_utf8.dcm", INGESTED, CASES["charset_lies"], ds,
                  phi=PATIENT_LIAR.phi() | {"Ødegårdsen"})

    # -- sequences nested 400 deep (a recursion bomb for a recursive reader or rebuild) ------------
    ds = base_instance("DX", seed=24)
    PATIENT_DEEP.apply(ds)
    inner = item(LUTDescriptor=[4, 0, 16], LUTExplanation="PHIDEEPNEST TIEFGANG")
    for _ in range(400):
        inner = item(LUTDescriptor=[4, 0, 16], LUTExplanation="PHIDEEPNEST SIEGLINDE",
                     VOILUTSequence=Sequence([inner]))
    ds.VOILUTSequence = Sequence([inner])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))
    try:
        save(ds, root / "nesting" / "deep_sequences.dcm")
    finally:
        sys.setrecursionlimit(limit)
    ds.VOILUTSequence = Sequence()  # the planted dataset itself stays shallow (tests walk it)
    planted.plant("nesting/deep_sequences.dcm", ANY, CASES["deep_nesting"], ds, phi=PATIENT_DEEP.phi())

    # -- malformed dates ---------------------------------------------------------------------------
    ds = base_instance("DX", seed=30)
    PATIENT_DATES.apply(ds)
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = "2021-03-04", "20211399", "2021.03.05", "20210304"
    save(ds, root / "dates" / "bad_dates.dcm")
    planted.plant("dates/bad_dates.dcm", INGESTED, CASES["bad_dates"], ds,
                  phi=PATIENT_DATES.phi() | {"2021-03-04", "20211399", "2021.03.05", "20210304", "20210305",
                                             "19xx0101"})

    # -- a legacy file: no preamble, no meta -------------------------------------------------------
    ds = base_instance("CR", seed=40, transfer_syntax=ImplicitVRLittleEndian)
    PATIENT_LEGACY.apply(ds)
    ds.StudyDate = "20050505"
    save(ds, root / "legacy" / "no_preamble.dcm", data=without_meta(dataset_bytes(ds)))
    planted.plant("legacy/no_preamble.dcm", INGESTED, CASES["legacy"], ds, phi=PATIENT_LEGACY.phi())

    # -- size bombs --------------------------------------------------------------------------------
    if big:
        ds = base_instance("DX", seed=50)
        PATIENT_BOMB.apply(ds)
        save(ds, root / "bombs" / "huge_sparse.dcm")
        os.truncate(root / "bombs" / "huge_sparse.dcm", 2 * GB + 1)
        planted.plant("bombs/huge_sparse.dcm", "too_large", CASES["huge_sparse"], ds, phi=PATIENT_BOMB.phi())
        planted.huge.append("bombs/huge_sparse.dcm")
    else:
        planted.skipped["huge_sparse"] = "big=False"
    ds = rle_bomb(seed=51)
    PATIENT_BOMB.apply(ds)
    save(ds, root / "bombs" / "rle_65535.dcm")
    planted.plant("bombs/rle_65535.dcm", "too_large", CASES["rle_bomb"], ds, phi=PATIENT_BOMB.phi())
    ds = base_instance("CT", seed=52)
    PATIENT_BOMB.apply(ds)
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = 40000
    save(ds, root / "bombs" / "frames_bomb.dcm")
    planted.plant("bombs/frames_bomb.dcm", "too_large", CASES["frames_bomb"], ds, phi=PATIENT_BOMB.phi())

    # -- special files -----------------------------------------------------------------------------
    (root / "special").mkdir()
    os.mkfifo(root / "special" / "fifo.dcm")
    planted.fifos.append(root / "special" / "fifo.dcm")
    planted.plant("special/fifo.dcm", "special_file", CASES["fifo"])
    make_socket(root / "special" / "socket.dcm")
    planted.plant("special/socket.dcm", "special_file", CASES["socket"])
    if os.geteuid() != 0:
        locked = root / "unreadable" / "locked.dcm"
        ds = base_instance("DX", seed=60)
        PATIENT_JUNK.apply(ds)
        save(ds, locked)
        locked_dir = root / "unreadable" / "locked_dir"
        save(ds, locked_dir / "inner.dcm")
        locked.chmod(0)
        locked_dir.chmod(0)
        planted.plant("unreadable/locked.dcm", "unreadable", CASES["unreadable"], ds, phi=PATIENT_JUNK.phi())
        planted.plant("unreadable/locked_dir", "unreadable", CASES["unreadable"])
    else:
        planted.skipped["unreadable"] = "running as root: mode 000 does not stop root from reading"

    # -- symlinks ----------------------------------------------------------------------------------
    secret = base_instance("DX", seed=70)
    PATIENT_OUTSIDE.apply(secret)
    secret.ImageComments = "PHIOUTSIDE this file is outside the input root"
    save(secret, outside / "secret.dcm")
    save(secret, outside / "secret_dir" / "inside_outside.dcm")
    planted.phi |= PATIENT_OUTSIDE.phi() | {str(secret.StudyInstanceUID), str(secret.SOPInstanceUID)}
    planted.study_labels[str(secret.StudyInstanceUID)] = "normal"  # followed, it would be ingested
    links = root / "links"
    links.mkdir()
    os.symlink("does_not_exist.dcm", links / "dangling.dcm")
    os.symlink("loop_b.dcm", links / "loop_a.dcm")
    os.symlink("loop_a.dcm", links / "loop_b.dcm")
    os.symlink("self.dcm", links / "self.dcm")
    os.symlink(outside / "secret.dcm", links / "outside_abs.dcm")
    os.symlink(os.path.relpath(outside / "secret.dcm", links), links / "outside_rel.dcm")
    os.symlink(os.path.relpath(root / "PESEL7712019_KOWALSKI", links), links / "dir_inside")
    os.symlink(outside / "secret_dir", links / "dir_outside")
    for name in ("dangling.dcm", "loop_a.dcm", "loop_b.dcm", "self.dcm", "outside_abs.dcm", "outside_rel.dcm",
                 "dir_inside", "dir_outside"):
        planted.plant(f"links/{name}", "symlink", CASES["symlinks"])
    os.symlink(os.path.relpath(root / utf8_relpath, links), links / "zz_to_inside.dcm")
    planted.plant("links/zz_to_inside.dcm", "duplicate", "a link to a regular file inside the root: read like a "
                  "file, so a duplicate of charsets/Иванова.dcm")

    # -- names -------------------------------------------------------------------------------------
    (root / "names").mkdir()
    ds = base_instance("DX", seed=80)
    PATIENT_NAMES.apply(ds)
    bad = b"names/\xff\xfe.dcm"
    save(ds, os.fsencode(root) + b"/" + bad)
    planted.plant(bad, "bad_name", CASES["bad_name"], ds, phi=PATIENT_NAMES.phi())
    for k, name in enumerate(('odd, "quoted" name.dcm', "=cmd|calc.dcm")):
        ds = base_instance("DX", seed=81 + k)
        PATIENT_NAMES.apply(ds)
        save(ds, root / "names" / name)
        planted.plant(f"names/{name}", INGESTED, CASES["odd_names"], ds, phi=PATIENT_NAMES.phi())

    # -- junk and the usual rejections -----------------------------------------------------------
    (root / "junk").mkdir()
    (root / "junk" / "notes.txt").write_text("PHINOTES patient OHNEKENNUNG^BRUNHILDE, MRN JNK-30381, call back\n")
    planted.plant("junk/notes.txt", "not_dicom", CASES["junk"], phi=PATIENT_JUNK.phi())
    (root / "junk" / "empty.dcm").write_bytes(b"")
    planted.plant("junk/empty.dcm", "not_dicom", CASES["junk"])
    ds = base_instance("DX", seed=90)
    PATIENT_JUNK.apply(ds)
    ds.PatientID = ""
    save(ds, root / "junk" / "no_patient_id.dcm")
    planted.plant("junk/no_patient_id.dcm", "missing_patient_id", CASES["junk"], ds, phi=PATIENT_JUNK.phi())

    sop = generate_uid()
    for k, name in enumerate(("conflict_a.dcm", "conflict_b.dcm")):
        ds = base_instance("DX", seed=100 + k)
        PATIENT_DUP.apply(ds)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        save(ds, root / "dup" / name)
        planted.plant(f"dup/{name}", "duplicate", CASES["duplicates"], ds, phi=PATIENT_DUP.phi())

    ds = base_instance("DX", seed=110)
    PATIENT_JUNK.apply(ds)
    data = dataset_bytes(ds)
    good = b"1.2.840.10008.1.2.1\x00"
    at = data.index(good, 132)
    data = data[:at] + b"JNK-30381_BOGUS_TS\x00\x00"[:len(good)] + data[at + len(good):]
    save(ds, root / "junk" / "bogus_syntax.dcm", data=data)
    planted.plant("junk/bogus_syntax.dcm", REJECTED, CASES["bogus_syntax"], ds, phi=PATIENT_JUNK.phi())

    ds = base_instance("DX", seed=111)
    PATIENT_A.apply(ds)
    ds.PixelData = ds.PixelData + b"PHIPIXTAIL MUSTERMANN^MAXIMILIAN MRN8842137 "
    save(ds, root / "pixels" / "tail.dcm")
    planted.plant("pixels/tail.dcm", INGESTED, CASES["pixel_tail"], ds, phi=PATIENT_A.phi())

    planted.write_labels()
    return planted


def rle_bomb(seed: int = 0) -> Dataset:
    """An RLE Lossless instance of ~4 KB whose header claims 65535 x 65535 x 16 bits (8 GiB decoded)."""
    ds = base_instance("DX", seed=seed, transfer_syntax=RLELossless)
    ds.Rows = ds.Columns = 65535
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    segment = b"\x81\x00" * 1000  # replicate runs: 128 zero bytes each
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = pydicom.encaps.encapsulate([header + segment + segment])
    ds["PixelData"].VR = "OB"
    return ds


def make_socket(path: Path) -> None:
    """A Unix socket file at ``path`` (bound via its folder when the path is too long for AF_UNIX)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) < 100:
            sock.bind(os.fsencode(path))
        else:
            cwd = os.getcwd()
            os.chdir(path.parent)
            try:
                sock.bind(path.name)
            finally:
                os.chdir(cwd)
    finally:
        sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


@contextlib.contextmanager
def fifo_guard(fifos: list[Path], after: float = 15.0) -> Iterator[SimpleNamespace]:
    """Unblocks a reader stuck opening one of ``fifos``: after ``after`` seconds, whoever still has
    one open for reading gets a writer (that closes at once: the reader sees end of file).
    ``.blocked`` lists the FIFOs that had to be released (a run that blocked on them)."""
    state = SimpleNamespace(blocked=[])
    stop = threading.Event()

    def release() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            for fifo in fifos:
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue  # ENXIO: nobody reading
                state.blocked.append(fifo)
                os.close(fd)
            stop.wait(0.2)

    thread = threading.Thread(target=release, name="fifo-guard", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()


def restore_permissions(root: Path) -> None:
    """Make a corpus removable again (mode 000 entries)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
