"""De-identification rules on hand-made instances: the allow-list rebuild and its keep-list."""

from __future__ import annotations

import datetime as dt
import io

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline import deid

KEY = b"unit-test-key-unit-test-key"


def _instance(patient_id: str, study_uid: str, study_date: str, name: str = "DOE^JANE") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "NORTHFIELD_PACS"
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, study_uid + ".1"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, "19630412", "F"
    ds.PatientAge = "061Y"
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyDescription = f"CHEST PA {name}"
    ds.InstitutionName, ds.ReferringPhysicianName = "Northfield General Hospital", "HOUSE^GREGORY"
    ds.AccessionNumber = "ACC998877"
    ds.Modality, ds.Manufacturer, ds.ViewPosition = "DX", "ACME Imaging", "PA"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 4, 4, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.PixelData = bytes(32)
    block = ds.private_block(0x0019, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", name)
    return ds


def _date(ds: Dataset) -> dt.date:
    return dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()


def test_dates_shift_by_one_offset_per_patient():
    pseudo = deid.Pseudonymizer(KEY)
    a1, a2 = _instance("MRN1", "1.2.3.1", "20200105"), _instance("MRN1", "1.2.3.2", "20200704")
    b1 = _instance("MRN2", "1.2.3.3", "20200105", name="ROE^RICHARD")
    out_a1, out_a2 = (pseudo.deidentify(ds, pseudo.patient_key("MRN1")) for ds in (a1, a2))
    out_b1 = pseudo.deidentify(b1, pseudo.patient_key("MRN2"))
    shift_a = _date(out_a1) - _date(a1)
    assert shift_a.days <= -365
    assert _date(out_a2) - _date(a2) == shift_a, "one patient's studies shifted by different offsets"
    assert (_date(out_a2) - _date(out_a1)).days == 181, "the interval between studies must survive"
    assert _date(out_b1) - _date(b1) != shift_a, "two patients share a date offset"
    assert out_a1.LongitudinalTemporalInformationModified == "MODIFIED"


@pytest.mark.parametrize("written, kept", [("2020-01-05", True), ("2020.01.05", True), ("20201305", False),
                                           ("19xx0101", False), ("DOE^JANE", False)])
def test_a_malformed_date_is_repaired_or_dropped_never_copied(written, kept):
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    good = pseudo.deidentify(ds, "P-1").StudyDate
    ds.StudyDate = written
    out = pseudo.deidentify(ds, "P-1")
    assert out.StudyDate == (good if kept else ""), "StudyDate is type 2: present, repaired or empty"
    assert written not in str(out)


def test_rebuild_keeps_the_list_and_nothing_else():
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    ds.add_new(0x00380010, "LO", "ADM-55512")  # AdmissionID: not on any keep-list
    ds.add_new(0x00711010, "LO", "unknown public tag")  # odd group 0x0071 would be private; use an even one
    ds.add_new(0x00720000 + 0x7777, "UN", b"UNKNOWN-PUBLIC")  # unknown public tag, VR UN
    context = Dataset()
    context.TextValue = "patient DOE said"
    ds.AcquisitionContextSequence = pydicom.Sequence([context])
    key = pseudo.patient_key("MRN1")
    out = pseudo.deidentify(ds, key)
    assert out.PatientID == key and str(out.PatientName) == key
    assert out.PatientBirthDate == "" and out.AccessionNumber == "" and out.ReferringPhysicianName == ""
    assert out.PatientSex == "F" and out.PatientAge == "061Y", "patient characteristics are retained (113108)"
    assert out.ViewPosition == "PA" and out.Manufacturer == "ACME Imaging"
    kept = {elem.keyword for elem in out}
    added = {"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
             "LongitudinalTemporalInformationModified"}
    assert kept - added <= {k.keyword for k in deid.KEEP.values()}
    for gone in ("StudyDescription", "InstitutionName", "AdmissionID", "AcquisitionContextSequence"):
        assert gone not in out
    assert not any(e.tag.is_private for e in out.iterall())
    assert 0x00727777 not in out
    assert out.StudyInstanceUID != "1.2.3.1" and out.StudyInstanceUID.startswith("2.25.")
    assert out.SeriesInstanceUID == pseudo.uid("1.2.3.1.1"), "the same UID maps the same way in every file"
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.preamble == b"\x00" * 128
    assert out.PatientIdentityRemoved == "YES" and len(out.DeidentificationMethod) <= 64
    assert {c.CodeValue for c in out.DeidentificationMethodCodeSequence} == {"113100", "113105", "113107", "113108"}
    buffer = io.BytesIO()
    out.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.PixelData == ds.PixelData and back.Rows == 4
    for phi in (b"DOE", b"JANE", b"MRN1", b"Northfield", b"NORTHFIELD", b"HOUSE", b"ACC998877", b"19630412"):
        assert phi not in buffer.getvalue()
    assert ds.PatientID == "MRN1", "the source dataset is not changed"


@pytest.mark.parametrize("keyword, value", [("Manufacturer", "DOE^JANE"), ("ManufacturerModelName", "model of Jane"),
                                            ("BodyPartExamined", "MRN1"), ("ConvolutionKernel", "HOUSE")])
def test_a_kept_value_that_names_someone_from_the_header_is_blanked(keyword, value):
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    setattr(ds, keyword, value)
    out = pseudo.deidentify(ds, "P-1")
    assert out.get(keyword, "") == ""


def test_a_name_found_only_inside_a_sequence_is_blanked_where_a_kept_value_repeats_it():
    """A performing physician named only in a nested item (dropped) must not survive in a kept top-level value."""
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    step = Dataset()
    step.PerformingPhysicianName = "ZWIEBELKNECHT^OTTO"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.9"
    inner.ContentSequence = pydicom.Sequence([Dataset()])
    inner.ContentSequence[0].PersonName = "QUASTHOFF^ILSE"
    step.ReferencedImageSequence = pydicom.Sequence([inner])
    ds.PerformedProtocolCodeSequence = pydicom.Sequence([step])
    ds.Manufacturer, ds.ConvolutionKernel = "Zwiebelknecht Medical", "QUASTHOFF"
    ds.ManufacturerModelName = "XR-5000"
    out = pseudo.deidentify(ds, "P-1")
    assert out.get("Manufacturer", "") == "" and out.get("ConvolutionKernel", "") == ""
    assert out.ManufacturerModelName == "XR-5000", "a clean kept value stays"


@pytest.mark.parametrize("keyword, value", [("PixelSpacing", "DOE"), ("PatientSex", "DOE JANE"),
                                            ("PatientAge", "Jane is 61"), ("SOPClassUID", "DOE.JANE")])
def test_a_kept_value_invalid_for_its_vr_is_dropped(keyword, value):
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    ds.add_new(tag_for_keyword(keyword), "LO" if keyword != "SOPClassUID" else "UI", value)
    out = pseudo.deidentify(ds, "P-1")
    assert value not in str(out)


def test_age_over_89_is_aggregated():
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    ds.PatientAge = "094Y"
    assert pseudo.deidentify(ds, "P-1").PatientAge == "090Y"


def test_patient_key_is_keyed_and_stable():
    a, b = deid.Pseudonymizer(KEY), deid.Pseudonymizer(b"some-other-key-0123456789")
    assert a.patient_key("MRN1") == a.patient_key("MRN1")
    assert a.patient_key("MRN1") != a.patient_key("MRN2")
    assert a.patient_key("MRN1") != b.patient_key("MRN1")
    assert a.patient_key("MRN1", issuer="SITE_A") != a.patient_key("MRN1", issuer="SITE_B")
    assert "MRN1" not in a.patient_key("MRN1")
    assert a.file_id("MRN1/DOE_JANE/1.dcm").startswith("f-") and "DOE" not in a.file_id("MRN1/DOE_JANE/1.dcm")


# --------------------------------------------------------------------------------------------------
# the keep-list against DICOM PS3.15 Table E.1-1


def _table_e11() -> dict[int, str]:
    """Basic Profile actions of PS3.15 Table E.1-1, 2026c edition (dicom-anonymizer's transcription)."""
    fields = pytest.importorskip("dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c")
    names = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
             "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
    table: dict[int, str] = {}
    for name, action in names.items():
        for entry in getattr(fields, name):
            if len(entry) == 2:  # (group, element); 4-tuples are masked ranges (curves, overlays): never kept
                table[(entry[0] << 16) | entry[1]] = action
    assert len(table) > 600
    return table


def test_keep_list_matches_ps3_15_table_e1_1():
    """Every row's ``profile`` is the standard's action, and keeping it is allowed by it or an option."""
    table = _table_e11()
    for tag, rule in deid.KEEP.items():
        assert rule.reason, f"{rule.keyword}: every kept attribute says why"
        assert rule.profile == table.get(tag, "-"), f"{rule.keyword}: Table E.1-1 says {table.get(tag, '-')}"
        if rule.profile == "-":
            continue
        if rule.action == "uid":
            assert "U" in rule.profile
        elif rule.action in ("empty", "pseudonym"):
            assert "Z" in rule.profile or "D" in rule.profile
        elif rule.action == "date":
            assert rule.option == "113107", f"{rule.keyword}: shifted dates need the Modified Dates option"
        else:
            assert rule.option == "113108", f"{rule.keyword}: kept although E.1-1 says {rule.profile}"
    options = {code for code, _ in deid.METHOD_CODES}
    assert {r.option for r in deid.KEEP.values() if r.option} <= options, "an option used is recorded"


def test_keep_list_holds_no_free_text_or_identifiers_by_design():
    forbidden_vrs = {"PN", "DT", "TM"}
    for rule in deid.KEEP.values():
        if rule.action != "pseudonym" and rule.action != "empty":
            assert dictionary_VR(rule.tag) not in forbidden_vrs, rule.keyword
    for keyword in deid.IDENTIFIER_KEYWORDS:
        rule = deid.KEEP.get(tag_for_keyword(keyword))
        assert rule is None or rule.action in ("empty", "pseudonym"), keyword


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm",
                                  "MR_small_bigendian.dcm", "rtdose.dcm", "SC_rgb_rle.dcm"])
def test_encode_writes_exactly_what_pydicom_writes(name):
    """deid.encode's fast path (raw headers packed here) gives the bytes of pydicom's element writer,
    and the file reads back with every kept element equal to the rebuilt dataset's."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom's test files")
    out = deid.Pseudonymizer(KEY).deidentify(pydicom.dcmread(path), "P-1")
    fast = deid.encode(out)
    assert fast == deid.encode(out, fast=False)
    back = pydicom.dcmread(io.BytesIO(fast))
    assert fast[:132] == b"\x00" * 128 + b"DICM"
    assert sorted(back.keys()) == sorted(out.keys())
    for tag in out.keys():
        assert back[tag].value == out[tag].value, tag
