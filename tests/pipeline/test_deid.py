"""De-identification rules on hand-made instances."""

from __future__ import annotations

import datetime as dt

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline import deid

KEY = b"unit-test-key-unit-test-key"


def _instance(patient_id: str, study_uid: str, study_date: str, name: str = "DOE^JANE") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, study_uid + ".1"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, name, "19630412", "F"
    ds.StudyDate = ds.SeriesDate = study_date
    ds.StudyDescription = f"CHEST PA {name}"
    ds.InstitutionName, ds.ReferringPhysicianName = "Northfield General Hospital", "HOUSE^GREGORY"
    ds.AccessionNumber = "ACC998877"
    block = ds.private_block(0x0019, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", name)
    return ds


def _date(ds: Dataset) -> dt.date:
    return dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()


def test_dates_shift_by_one_offset_per_patient():
    pseudo = deid.Pseudonymizer(KEY)
    a1, a2 = _instance("MRN1", "1.2.3.1", "20200105"), _instance("MRN1", "1.2.3.2", "20200704")
    b1 = _instance("MRN2", "1.2.3.3", "20200105", name="ROE^RICHARD")
    originals = {id(x): _date(x) for x in (a1, a2, b1)}
    for ds in (a1, a2):
        pseudo.deidentify(ds, pseudo.patient_key("MRN1"))
    pseudo.deidentify(b1, pseudo.patient_key("MRN2"))
    shift_a = _date(a1) - originals[id(a1)]
    assert shift_a.days != 0
    assert _date(a2) - originals[id(a2)] == shift_a, "one patient's studies shifted by different offsets"
    assert (_date(a2) - _date(a1)).days == 181, "the interval between studies must survive"
    assert _date(b1) - originals[id(b1)] != shift_a, "two patients share a date offset"


def test_profile_removals_and_pseudonyms():
    pseudo = deid.Pseudonymizer(KEY)
    ds = _instance("MRN1", "1.2.3.1", "20200105")
    key = pseudo.patient_key("MRN1")
    pseudo.deidentify(ds, key)
    assert ds.PatientID == key and str(ds.PatientName) == key
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert "StudyDescription" not in ds and "InstitutionName" not in ds
    assert not any(e.tag.is_private for e in ds)
    assert ds.PatientSex == "F", "patient characteristics are retained (option 113108)"
    assert ds.StudyInstanceUID != "1.2.3.1" and ds.SeriesInstanceUID != "1.2.3.1.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientIdentityRemoved == "YES"
    assert len(ds.DeidentificationMethod) <= 64


def test_patient_key_is_keyed_and_stable():
    a, b = deid.Pseudonymizer(KEY), deid.Pseudonymizer(b"some-other-key-0123456789")
    assert a.patient_key("MRN1") == a.patient_key("MRN1")
    assert a.patient_key("MRN1") != a.patient_key("MRN2")
    assert a.patient_key("MRN1") != b.patient_key("MRN1")
    assert a.patient_key("MRN1", issuer="SITE_A") != a.patient_key("MRN1", issuer="SITE_B")
    assert "MRN1" not in a.patient_key("MRN1")


def test_key_resolution(tmp_path, monkeypatch):
    for var in (deid.ENV_KEY, deid.ENV_KEY_FILE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(deid.KeyMissingError, match="medtl keygen"):
        deid.resolve_key(synthetic=False)
    assert deid.resolve_key(synthetic=True)[0] == deid.DEMO_KEY
    monkeypatch.setenv(deid.ENV_KEY, "from-the-environment-123")
    assert deid.resolve_key(synthetic=False) == (b"from-the-environment-123", "$MEDTL_PSEUDONYM_KEY")
    monkeypatch.delenv(deid.ENV_KEY)
    (tmp_path / "short.key").write_text("abc")
    monkeypatch.setenv(deid.ENV_KEY_FILE, str(tmp_path / "short.key"))
    with pytest.raises(deid.KeyMissingError, match="shorter than 16"):
        deid.resolve_key(synthetic=True)
    monkeypatch.setenv(deid.ENV_KEY_FILE, str(tmp_path / "absent.key"))
    with pytest.raises(deid.KeyMissingError, match="does not exist"):
        deid.resolve_key(synthetic=True)
