"""Preprocessing: physical units, VOI, MONOCHROME1, geometry, and the stage on the synthetic cohort."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline import preprocess
from pipeline.preprocess import Image, PreprocessParams


def _ct_file(path: Path, hu: np.ndarray, *, signed: bool, intercept: float, slope: float = 1.0,
             position=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), spacing=(0.7, 0.9), series_uid=None,
             photometric="MONOCHROME2", modality="CT") -> None:
    stored = np.round((hu - intercept) / slope)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = "1.2.3.4"
    ds.Modality, ds.PatientID = modality, "P"
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [spacing[0], spacing[1]]  # (row, column) mm
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = list(orientation)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(("signed", "intercept", "slope"), [(True, 0.0, 1.0), (False, -1024.0, 1.0),
                                                            (True, -1024.0, 1.0), (False, -8192.0, 0.5)])
def test_hu_is_the_same_whatever_the_storage(tmp_path, signed, intercept, slope):
    hu = np.array([[-1000, -600, 0, 40], [400, 1000, -100, 3000]] * 2, dtype=np.float32)
    _ct_file(tmp_path / "a.dcm", hu, signed=signed, intercept=intercept, slope=slope)
    np.testing.assert_allclose(preprocess.read_2d(tmp_path / "a.dcm").array, hu, atol=slope / 2)


def test_window_presets_map_known_hu_to_known_intensities():
    image = Image(np.zeros((1, 1)), (1, 1), (0, 0), (1, 0, 0, 1))
    hu = np.array([-1350.0, -600.0, 150.0, 40.0, -160.0, 240.0])
    lung = preprocess.window(hu, "lung", image, (0.5, 99.5))
    np.testing.assert_allclose(lung[:3], [0.0, 0.5, 1.0])
    mediastinum = preprocess.window(hu, "mediastinum", image, (0.5, 99.5))
    np.testing.assert_allclose(mediastinum[3:], [0.5, 0.0, 1.0])


def test_dataset_percentile_window_keeps_relative_brightness():
    dark = Image(np.linspace(100, 500, 100), (1, 1), (0, 0), (1, 0, 0, 1))
    bright = Image(np.linspace(500, 900, 100), (1, 1), (0, 0), (1, 0, 0, 1))
    per_image = [preprocess.window(im.array, "percentile", im, (0, 100)).mean() for im in (dark, bright)]
    assert per_image[0] == pytest.approx(per_image[1]), "per-image percentiles equalise the two"
    dataset = [preprocess.window(im.array, "dataset_percentile", im, (0, 100), (100.0, 900.0)) for im in (dark, bright)]
    assert dataset[0].mean() == pytest.approx(0.25) and dataset[1].mean() == pytest.approx(0.75)
    assert dataset[0].min() == 0.0 and dataset[1].max() == 1.0


def test_instance_window_and_monochrome1_inversion():
    values = np.array([0.0, 500.0, 1000.0])
    m2 = Image(values, (1, 1), (0, 0), (1, 0, 0, 1), "MONOCHROME2", window=(500.0, 1000.0))
    m1 = Image(values, (1, 1), (0, 0), (1, 0, 0, 1), "MONOCHROME1", window=(500.0, 1000.0))
    a = preprocess.window(values, "instance", m2, (0.5, 99.5))
    b = preprocess.window(values, "instance", m1, (0.5, 99.5))
    np.testing.assert_allclose(a, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(a + b, 1.0)


def test_monochrome1_file_inverts_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4000, (16, 16)).astype(np.float32)
    _ct_file(tmp_path / "m2.dcm", values, signed=False, intercept=0, photometric="MONOCHROME2", modality="CR",
             spacing=(1.0, 1.0))
    _ct_file(tmp_path / "m1.dcm", values, signed=False, intercept=0, photometric="MONOCHROME1", modality="CR",
             spacing=(1.0, 1.0))
    params = PreprocessParams(size=16, channels=1)
    a = preprocess.to_tensor(preprocess.read_2d(tmp_path / "m2.dcm"), "CR", params)
    b = preprocess.to_tensor(preprocess.read_2d(tmp_path / "m1.dcm"), "CR", params)
    np.testing.assert_allclose(a + b, 1.0, atol=1e-5)


def test_series_geometry_slice_order_orientation_and_spacing(tmp_path):
    """16×16×4 coronal series, anisotropic spacing, files named against slice order."""
    rows, cols, n = 16, 16, 4
    row_mm, col_mm, step = 0.7, 0.9, 3.0
    orientation = (1, 0, 0, 0, 0, -1)  # rows run along +x (patient left), columns along -z (feet)
    uid = generate_uid()
    names = [f"IM{k}" for k in random.Random(1).sample(range(n), n)]
    for k in range(n):  # slice k at y = 10 + 3k mm; its value marks its order
        hu = np.full((rows, cols), -1000.0 + 100 * k, dtype=np.float32)
        if k == 2:
            hu[3, 5] = 2000.0  # a marker at row 3, column 5 of the third slice
        _ct_file(tmp_path / names[k], hu, signed=True, intercept=0, position=(-5.0, 10 + step * k, 20.0),
                 orientation=orientation, spacing=(row_mm, col_mm), series_uid=uid)
    image = preprocess.read_volume([tmp_path / name for name in names], spacing_mm=None)
    # LPS: array axes (z, y, x) follow +z (head), +y (posterior), +x (left)
    np.testing.assert_allclose(np.array(image.direction).reshape(3, 3), np.eye(3), atol=1e-6)
    assert image.array.shape == (rows, n, cols)  # z from the 16 rows, y from the 4 slices, x from columns
    np.testing.assert_allclose(image.spacing, (col_mm, step, row_mm), atol=1e-4)
    # slices ordered by position, not by file name: value rises with y
    np.testing.assert_allclose(image.array[0, :, 0], [-1000, -900, -800, -700])
    z, y, x = np.unravel_index(int(np.argmax(image.array)), image.array.shape)
    marker_mm = np.array([-5.0 + 5 * col_mm, 10 + 2 * step, 20.0 - 3 * row_mm])
    origin = np.array(image.origin)
    np.testing.assert_allclose(origin + np.array([x, y, z]) * np.array(image.spacing), marker_mm, atol=1e-4)
    # resampling keeps the physical extent
    resampled = preprocess.read_volume([tmp_path / name for name in names], spacing_mm=(1.8, 1.5, 1.4))
    np.testing.assert_allclose(resampled.spacing, (1.8, 1.5, 1.4))
    assert resampled.array.shape == (round(rows * row_mm / 1.4), round(n * step / 1.5), round(cols * col_mm / 1.8))


def test_reductions_and_fit_keep_aspect():
    volume = np.zeros((9, 4, 8), np.float32)
    volume[:, :, :] = np.arange(9)[:, None, None]
    assert preprocess.reduce_volume(volume, 2.0, "key_slice", 10)[0, 0, 0] == 4
    assert preprocess.reduce_volume(volume, 2.0, "mip", 4)[0, 0, 0] == 5
    np.testing.assert_array_equal(preprocess.reduce_volume(volume, 2.0, "2.5d", 4)[:, 0, 0], [3, 4, 5])
    fitted = preprocess.fit(np.ones((1, 10, 20), np.float32), (1.0, 1.0), 32)  # wide image: padded top/bottom
    assert fitted.shape == (1, 32, 32)
    filled = fitted[0].sum(axis=1) > 0
    assert filled.sum() == 16 and not filled[:8].any() and not filled[-8:].any()
    fitted = preprocess.fit(np.ones((1, 10, 10), np.float32), (2.0, 1.0), 32)  # 20 mm wide, 10 mm high
    assert (fitted[0].sum(axis=1) > 0).sum() == 16


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="reduce_3d"):
        PreprocessParams(reduce_3d="average")
    with pytest.raises(ValueError, match="window"):
        PreprocessParams(window={"CT": "brain"})


@pytest.mark.slow
def test_stage_on_the_synthetic_cohort(ingested, tmp_path):
    ingest_dir, ingest_summary = ingested
    params = PreprocessParams(size=64, workers=2, window={"CT": "lung", "default": "dataset_percentile"},
                              fingerprint_sample=4)
    summary = preprocess.run(params, ingest_dir, tmp_path / "a")
    tensors = np.load(tmp_path / "a" / "tensors.npy", mmap_mode="r")
    index = pd.read_parquet(tmp_path / "a" / "index.parquet")
    assert tensors.shape == (summary.images, 3, 64, 64) == (len(index), 3, 64, 64)
    assert summary.images + summary.rejected == ingest_summary.images
    assert list(index["row"]) == list(range(len(index)))
    assert float(tensors.min()) >= 0.0 and float(tensors.max()) <= 1.0
    fingerprint = json.loads((tmp_path / "a" / "fingerprint.json").read_text())
    assert fingerprint["labels"] == dict(index["label"].value_counts().sort_index())
    assert {"CT", "DX", "CR"} <= set(fingerprint["modalities"])
    ct = fingerprint["modalities"]["CT"]["intensity_percentiles"]
    assert ct["p0.5"] < -900 and ct["p99.5"] > 200, "CT percentiles should be in HU"
    windows = fingerprint["dataset_windows"]  # one (low, high) per radiograph modality and site
    radiograph_groups = {f"{m}|{s}" for m, s in zip(index["modality"], index["site"]) if m in ("DX", "CR")}
    assert set(windows) == radiograph_groups and all(lo < hi for lo, hi in windows.values())
    # deterministic, whatever the number of workers
    preprocess.run(replace(params, workers=1), ingest_dir, tmp_path / "b")
    assert (tmp_path / "a" / "tensors.npy").read_bytes() == (tmp_path / "b" / "tensors.npy").read_bytes()
    pd.testing.assert_frame_equal(index, pd.read_parquet(tmp_path / "b" / "index.parquet"))
