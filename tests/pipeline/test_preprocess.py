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


# --------------------------------------------------------------------------------------------------
# lesion ground truth: the same geometry as the pixels


def _disc_centre(plane: np.ndarray) -> tuple[float, float, float]:
    """(row, col, radius) of the bright disc in a (H, W) tensor plane: centroid and sqrt(area / pi)."""
    mask = plane > 0.5
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean()), float(np.sqrt(mask.sum() / np.pi))


def test_lesion_on_a_2d_image_with_non_square_pixels_lands_on_its_disc(tmp_path):
    rows, cols, row_mm, col_mm = 40, 60, 0.5, 1.0  # 20 mm high, 60 mm wide: padded top and bottom
    centre, radius_mm = (15.0, 42.0), 5.0
    yy, xx = np.mgrid[:rows, :cols]
    disc = ((yy - centre[0]) * row_mm) ** 2 + ((xx - centre[1]) * col_mm) ** 2 <= radius_mm ** 2  # an ellipse in pixels
    _ct_file(tmp_path / "cr.dcm", np.where(disc, 3000.0, 500.0), signed=False, intercept=0, modality="CR",
             spacing=(row_mm, col_mm))
    params = PreprocessParams(size=64, channels=1, window={"default": "percentile"}, percentiles=(0.0, 100.0))
    image = preprocess.read_2d(tmp_path / "cr.dcm")
    tensor = preprocess.to_tensor(image, "CR", params)
    mapped = preprocess.lesion_in_tensor([preprocess.LesionMark(*centre, radius_mm)], image, params)
    found = _disc_centre(tensor[0])
    assert mapped[0] == pytest.approx(found[0], abs=1.0) and mapped[1] == pytest.approx(found[1], abs=1.0)
    assert mapped[2] == pytest.approx(found[2], abs=1.0) and mapped[2] == pytest.approx(radius_mm * 64 / 60)


def _sphere_series(folder: Path, centre_mm, radius_mm: float, n: int = 12, size: int = 20, pixel_mm: float = 0.8,
                   step: float = 2.0, origin=(-10.0, 30.0, -100.0)) -> list[preprocess.LesionMark]:
    """An axial series with a sphere of +100 HU in air; the sidecar-like marks of the slices it cuts."""
    uid = generate_uid()
    yy, xx = np.mgrid[:size, :size]
    marks = []
    for k in range(n):
        position = (origin[0], origin[1], origin[2] + step * k)
        dz = position[2] - centre_mm[2]
        x, y = origin[0] + xx * pixel_mm, origin[1] + yy * pixel_mm
        inside = (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + dz ** 2 <= radius_mm ** 2
        _ct_file(folder / f"IM{k}", np.where(inside, 100.0, -1000.0), signed=True, intercept=-1024,
                 position=position, spacing=(pixel_mm, pixel_mm), series_uid=uid)
        if abs(dz) < radius_mm:
            marks.append(preprocess.LesionMark((centre_mm[1] - origin[1]) / pixel_mm, (centre_mm[0] - origin[0]) / pixel_mm,
                                               float(np.sqrt(radius_mm ** 2 - dz ** 2)), position=position,
                                               orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(pixel_mm, pixel_mm)))
    return marks


def test_lesion_in_a_ct_volume_lands_on_its_key_slice_disc(tmp_path):
    # 12 slices 2 mm apart from z = -100; resampled to 2.5 mm: 10 slices, the key slice (5) at z = -87.5
    centre, radius_mm = (-1.6, 38.0, -89.0), 5.0
    marks = _sphere_series(tmp_path, centre, radius_mm)
    params = PreprocessParams(size=32, channels=1, window={"CT": "lung"}, spacing_mm=(1.5, 1.5, 2.5))
    image = preprocess.read_volume([tmp_path / f"IM{k}" for k in range(12)], params.spacing_mm)
    tensor = preprocess.to_tensor(image, "CT", params)
    mapped = preprocess.lesion_in_tensor(marks, image, params)
    found = _disc_centre(tensor[0])
    assert mapped[0] == pytest.approx(found[0], abs=1.0) and mapped[1] == pytest.approx(found[1], abs=1.0)
    key_z = image.origin[2] + (image.array.shape[0] // 2) * image.spacing[2]
    cross_section_mm = np.sqrt(radius_mm ** 2 - (key_z - centre[2]) ** 2)
    box = preprocess.fit_box(*image.array.shape[1:], image.spacing[:2], params.size)
    assert mapped[2] == pytest.approx(cross_section_mm * box.scale, rel=0.02)
    assert mapped[2] == pytest.approx(found[2], abs=1.0)
    # one mark alone: the sphere is taken as centred on that slice
    alone = preprocess.lesion_in_tensor([marks[len(marks) // 2]], image, params)
    assert alone[:2] == pytest.approx(mapped[:2], abs=0.5)


def test_a_lesion_off_the_key_slice_is_dropped_but_a_mip_slab_keeps_it(tmp_path):
    centre, radius_mm = (-1.6, 38.0, -96.0), 3.0  # far below the key slice at z = -87.5
    marks = _sphere_series(tmp_path, centre, radius_mm)
    params = PreprocessParams(size=32, channels=1, spacing_mm=(1.5, 1.5, 2.5))
    image = preprocess.read_volume([tmp_path / f"IM{k}" for k in range(12)], params.spacing_mm)
    assert preprocess.lesion_in_tensor(marks, image, params) is None
    assert preprocess.lesion_in_tensor(marks, image, replace(params, reduce_3d="2.5d")) is None
    mip = replace(params, reduce_3d="mip", slab_mm=20.0)  # slab: slices 1..9, z -97.5 .. -77.5
    mapped = preprocess.lesion_in_tensor(marks, image, mip)
    box = preprocess.fit_box(*image.array.shape[1:], image.spacing[:2], mip.size)
    assert mapped is not None and mapped[2] == pytest.approx(radius_mm * box.scale, rel=0.02)
    found = _disc_centre(preprocess.to_tensor(image, "CT", mip)[0])
    assert mapped[0] == pytest.approx(found[0], abs=1.0) and mapped[1] == pytest.approx(found[1], abs=1.0)


def test_stage_carries_ingested_lesions_to_tensor_rows(tmp_path):
    from pipeline import ingest
    from tests.conftest import TEST_KEY

    raw = tmp_path / "raw"
    (raw / "ct").mkdir(parents=True)
    marks = _sphere_series(raw / "ct", (-1.6, 38.0, -89.0), 5.0)
    yy, xx = np.mgrid[:40, :60]
    disc = ((yy - 15) * 0.5) ** 2 + ((xx - 42) * 1.0) ** 2 <= 25
    _ct_file(raw / "cr.dcm", np.where(disc, 3000.0, 500.0), signed=False, intercept=0, modality="CR", spacing=(0.5, 1.0))
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    (tmp_path / "labels.csv").write_text("file,label\n" + "".join(f"{p.relative_to(raw).as_posix()},lesion\n" for p in files))
    headers = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in files}
    by_z = {float(h.ImagePositionPatient[2]): h for h in headers.values() if h.Modality == "CT"}
    lines = [(headers["cr.dcm"], 15.0, 42.0, 7.07, 5.0)]  # non-square pixels: the radius in mm is used
    lines += [(by_z[m.position[2]], m.row, m.col, m.radius_mm / 0.8, m.radius_mm) for m in marks]
    (tmp_path / "lesions.csv").write_text(",".join(ingest.LESION_COLUMNS) + "\n" + "".join(
        f"{h.StudyInstanceUID},{h.SeriesInstanceUID},{h.SOPInstanceUID},{r},{c},{rp},{rm}\n" for h, r, c, rp, rm in lines))
    ingest.run(ingest.IngestParams(workers=1), raw, tmp_path / "labels.csv", tmp_path / "ingest", key=TEST_KEY,
               lesions_csv=tmp_path / "lesions.csv")
    params = PreprocessParams(size=32, channels=1, workers=1, window={"CT": "lung", "default": "percentile"},
                              percentiles=(0.0, 100.0))
    summary = preprocess.run(params, tmp_path / "ingest", tmp_path / "out")
    tensors = np.load(tmp_path / "out" / "tensors.npy").astype(np.float32)
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    table = pd.read_parquet(tmp_path / "out" / "lesions.parquet")
    assert list(table.columns) == list(preprocess.LESION_COLUMNS) and len(table) == 2 == len(index)
    assert summary.lesions == {"images_with_ground_truth": 2, "images_with_lesion_in_tensor": 2, "lesions_in_tensor": 2,
                               "images_ground_truth_unmapped": 0}
    assert dict(zip(table["row"], table["image_id"])) == dict(zip(index["row"], index["image_id"]))
    for lesion in table.itertuples():
        found = _disc_centre(tensors[lesion.row, 0])
        assert (lesion.centre_row, lesion.centre_col) == pytest.approx(found[:2], abs=1.0), index.loc[lesion.row, "unit"]
        assert lesion.radius_px == pytest.approx(found[2], abs=1.0)

    # ground truth that cannot be mapped (a slice the unit does not have) costs the lesion, never the image
    truth = pd.read_parquet(tmp_path / "ingest" / "lesions.parquet")
    truth.loc[truth["slice_index"] > 0, "slice_index"] = 999
    truth.to_parquet(tmp_path / "ingest" / "lesions.parquet", index=False)
    again = preprocess.run(params, tmp_path / "ingest", tmp_path / "again")
    assert again.images == 2 and again.rejected == 0
    assert again.lesions == {"images_with_ground_truth": 2, "images_with_lesion_in_tensor": 1, "lesions_in_tensor": 1,
                             "images_ground_truth_unmapped": 1}
    assert np.array_equal(np.load(tmp_path / "again" / "tensors.npy"), np.load(tmp_path / "out" / "tensors.npy"))
