"""The Grad-CAM Secondary Capture: heat drawn only where the map says, over the image as the model saw it."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from pipeline import sc


def _header() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "DOE^JANE", "MRN123", "19600101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = "1.2.826.0.1.3680043.8.498.1", "20260101", "1200", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.DigitalXRayImageStorageForPresentation, pydicom.uid.generate_uid()
    ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), "DX"
    return ds


def test_the_overlay_is_coloured_exactly_where_the_map_is_above_its_floor_and_grey_elsewhere():
    image = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (3, 64, 1))
    cam = np.zeros((64, 64), np.float32)
    cam[20:30, 40:50] = 1.0
    cam[0:5, 0:5] = sc.CAM_FLOOR / 2  # below the floor: not drawn
    out = sc.overlay(image, cam)
    scale = out.shape[0] // 64
    assert out.shape == (64 * scale, 64 * scale, 3) and out.shape[0] >= sc.MIN_SIDE
    grey = (out[..., 0] == out[..., 1]) & (out[..., 1] == out[..., 2])
    drawn = np.kron(cam >= sc.CAM_FLOOR, np.ones((scale, scale), bool))
    assert not grey[drawn].any() and grey[~drawn].all()
    assert out[~drawn][:, 0].astype(int).tolist() == (np.kron(image[0], np.ones((scale, scale))) * 255).round()[
        ~drawn].astype(int).tolist(), "outside the heat, the pixels are the model's input"


def test_the_capture_is_a_valid_sc_in_the_original_study_with_stable_uids():
    header = _header()
    args = dict(score=0.8, threshold=0.5, positive_class="lesion", model_name="medtl", model_version="3",
                model_sha256="a" * 64)
    image, cam = np.full((3, 32, 32), 0.5, np.float32), np.eye(32, dtype=np.float32)
    first, again = sc.gradcam_capture(header, image, cam, **args), sc.gradcam_capture(header, image, cam, **args)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    other = sc.gradcam_capture(header, image, cam, **{**args, "model_sha256": "b" * 64})
    assert other.SOPInstanceUID != first.SOPInstanceUID, "another model's capture is another object"
    assert (first.StudyInstanceUID, first.PatientID) == (header.StudyInstanceUID, header.PatientID)
    assert first.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and first.BurnedInAnnotation == "YES"
    assert "not for diagnostic use" in first.SeriesDescription
    with pytest.raises(AttributeError):
        first.PixelSpacing  # noqa: B018 - no physical spacing is claimed for a rendered overlay


def test_making_the_dicom_results_logs_no_original_identifier(caplog):
    """highdicom logs the SOP Instance UID it copies the patient and study from (at INFO): not into ours."""
    import logging

    from pipeline import sr

    caplog.set_level(logging.DEBUG)
    header = _header()
    sc.gradcam_capture(header, np.full((3, 32, 32), 0.5, np.float32), np.eye(32, dtype=np.float32), score=0.8,
                       threshold=0.5, positive_class="lesion", model_name="medtl", model_version="3",
                       model_sha256="a" * 64)
    header.Rows, header.Columns = 32, 32
    sr.study_report([header], score=0.8, threshold=0.5, positive_class="lesion", model_name="medtl", model_version="3",
                    model_sha256="a" * 64, aggregation="max")
    for value in (header.SOPInstanceUID, header.StudyInstanceUID, header.PatientID, "DOE"):
        assert value not in caplog.text
