"""Preprocess: de-identified DICOM image units to fixed-size, model-ready tensors.

For each manifest row (see :mod:`pipeline.ingest`) :func:`load_unit` returns the image in physical
units with its geometry, then :func:`to_tensor` windows, reduces 3D to 2D, and resizes:

* pixels to physical units first: the modality LUT / rescale slope and intercept of each instance
  (CT to HU, signed and unsigned storage alike);
* 3D series are read with SimpleITK from the slice files ordered by position (as ingest listed
  them), oriented to LPS and resampled to ``spacing_mm``; then reduced to 2D: the key (middle) slice,
  2.5D (slices ``slab_mm / 2`` either side of the key slice as three channels) or a maximum-intensity
  projection over a ``slab_mm`` slab around the key slice;
* VOI per modality (``window``): a named preset in HU (:data:`WINDOW_PRESETS`), ``instance`` (the
  file's own WindowCenter/Width), ``percentile`` (the image's own ``percentiles``) or
  ``dataset_percentile`` (the ``percentiles`` of the physical values of up to ``fingerprint_sample``
  images per modality and site, computed in a first pass and written to the fingerprint);
  MONOCHROME1 images are inverted after windowing, so bright always means dense;
* resized so the longest side is ``size`` keeping the physical aspect ratio, zero-padded to square,
  channels replicated to ``channels`` (3 for ImageNet backbones).

Tensors go into ONE array file ``tensors.npy`` (N, C, size, size) float16 in [0, 1] (memory-mapped
by readers), with ``index.parquet`` (row → image keys, label, patient key, site) and
``fingerprint.json`` (spacings, intensity percentiles, class and site counts, output spec) that
downstream stages read instead of recomputing. Failures go to ``rejected.csv`` with a reason.

Lesion ground truth (ingest's ``lesions.parquet``, when a sidecar was given) is carried through the
same geometry as the pixels by :func:`lesion_in_tensor` into ``lesions.parquet`` (:data:`LESION_COLUMNS`:
tensor row, centre and radius in tensor pixels; empty without ground truth). It is not a label.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
import torch
from pydicom.pixels import apply_modality_lut

from pipeline.errors import MedtlError
from pipeline.fanout import FanoutParams, map_ordered
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, csv_text, remove_stale_temps
from pipeline.params import ParamsError, check, param

log = logging.getLogger(__name__)

#: (centre, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
}
REDUCTIONS = ("key_slice", "2.5d", "mip")
#: what ``preprocess.window`` may name per modality: a preset, or a window taken from the data
WINDOWS = (*WINDOW_PRESETS, "instance", "percentile", "dataset_percentile")
#: Columns of ``lesions.parquet``: tensor row (as in index.parquet), image, lesion centre and radius in
#: tensor pixels (0-based row/column of the (size, size) plane).
LESION_COLUMNS = ("row", "image_id", "centre_row", "centre_col", "radius_px")


class PreprocessError(ValueError):
    """An image unit that cannot be turned into a tensor; the message is the rejection reason."""


class PreprocessInputError(MedtlError, ValueError):
    """The ingest output gives nothing to preprocess."""


@dataclass(frozen=True)
class PreprocessParams:
    """params.yaml ``preprocess`` section.

    Attributes:
        size: output height = width in pixels.
        channels: 1, or 3 for ImageNet backbones (grey replicated; 2.5D fills them with slices).
        reduce_3d: ``key_slice``, ``2.5d`` or ``mip``.
        slab_mm: MIP slab thickness, or the distance between the 2.5D channels' slices × 2.
        spacing_mm: 3D resampling target (x, y, z) in mm.
        window: VOI per modality (preset name, ``instance`` or ``percentile``); key ``default``
            for the rest.
        percentiles: (low, high) for ``percentile`` / ``dataset_percentile`` windowing.
        fingerprint_sample: images per (modality, site) sampled for ``dataset_percentile``.
        workers: processes (or threads, or local Dask workers: see ``fanout``), >= 0: 0 = one per core,
            1 = in this process.
    """

    size: int = param(224, min=16, max=4096)
    channels: int = param(3, choices=(1, 3))
    reduce_3d: str = param("key_slice", choices=REDUCTIONS)
    slab_mm: float = param(10.0, min=0, min_exclusive=True)
    spacing_mm: tuple[float, float, float] = param((1.5, 1.5, 2.5), min=0, min_exclusive=True)
    window: dict[str, str] = param({"CT": "lung", "default": "percentile"}, choices=WINDOWS)
    percentiles: tuple[float, float] = param((0.5, 99.5), min=0, max=100)
    fingerprint_sample: int = param(32, min=1)
    workers: int = param(0, min=0)

    def __post_init__(self) -> None:
        check(self, "preprocess")
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        low, high = self.percentiles
        if not low < high:
            raise ParamsError(f"preprocess.percentiles: the low percentile must be below the high one, "
                              f"got [{low:g}, {high:g}]")

    def window_for(self, modality: str) -> str:
        return self.window.get(modality, self.window.get("default", "percentile"))


@dataclass
class Image:
    """An image in physical units with its geometry.

    Attributes:
        array: float32; 2D images (rows, cols) = (y, x); volumes (slices, rows, cols) = (z, y, x).
        spacing: mm per pixel along (x, y) for 2D, (x, y, z) for volumes (SimpleITK order).
        origin: mm, LPS, of the first pixel.
        direction: row-major direction cosines (4 values for 2D, 9 for volumes).
        photometric: the photometric interpretation of the stored pixels.
        window: the instance's own (centre, width), if the file has one.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    photometric: str = "MONOCHROME2"
    window: tuple[float, float] | None = None


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def read_2d(path: Path) -> Image:
    """One single-frame instance → physical values (modality LUT/rescale applied), grey."""
    ds = pydicom.dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise PreprocessError(f"multi-frame instance ({frames} frames): not supported yet")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a property of the file
        raise PreprocessError(f"pixel data does not decode ({type(exc).__name__})")  # the message may quote paths
    if arr.ndim == 3:  # colour: pydicom returns RGB (YBR converted); palette needs its LUT first
        if photometric == "PALETTE COLOR":
            arr = pydicom.pixels.apply_color_lut(arr, ds)
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        photometric = "MONOCHROME2"
    elif photometric == "PALETTE COLOR":
        rgb = pydicom.pixels.apply_color_lut(arr, ds)
        arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        photometric = "MONOCHROME2"
    else:
        arr = apply_modality_lut(arr, ds)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    return Image(
        array=np.asarray(arr, dtype=np.float32),
        spacing=(float(spacing[1]), float(spacing[0])),  # PixelSpacing is (row, column) = (y, x)
        origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
        photometric=photometric,
        window=(centre, width) if centre is not None and width else None,
    )


def read_volume(paths: list[Path], spacing_mm: tuple[float, float, float] | None = None) -> Image:
    """Slices of one series → a volume in physical units (HU for CT), oriented LPS, resampled.

    Args:
        paths: the slice files (any order: SimpleITK places them by ImagePositionPatient).
        spacing_mm: (x, y, z) target spacing; None keeps the native grid.
    """
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError:  # its message names paths: not chained into ours
        raise PreprocessError("series cannot be read as a volume (SimpleITK could not read it)") from None
    image = sitk.DICOMOrient(image, "LPS")
    if spacing_mm is not None:
        image = resample(image, spacing_mm)
    ds = pydicom.dcmread(paths[len(paths) // 2], stop_before_pixels=True)
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    return Image(
        array=sitk.GetArrayFromImage(image).astype(np.float32),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        window=(centre, width) if centre is not None and width else None,
    )


def resample(image: sitk.Image, spacing_mm: tuple[float, float, float]) -> sitk.Image:
    """Linear resampling onto ``spacing_mm`` (x, y, z), same origin and direction, same extent."""
    old_spacing, old_size = np.array(image.GetSpacing()), np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / np.array(spacing_mm))).astype(int)
    lowest = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         tuple(spacing_mm), image.GetDirection(), lowest, sitk.sitkFloat32)


def reduction_slices(n_slices: int, z_spacing: float, how: str, slab_mm: float) -> tuple[int, list[int]]:
    """Which slices of a (z, y, x) volume :func:`reduce_volume` uses: (key slice, slices it reads).

    ``key_slice``: the middle slice; ``mip``: every slice of the ``slab_mm`` slab around it; ``2.5d``: the
    slices ``slab_mm / 2`` below, at and above it (the channels, in order).
    """
    mid = n_slices // 2
    half = max(1, int(round(slab_mm / 2 / z_spacing)))
    if how == "key_slice":
        return mid, [mid]
    if how == "mip":
        return mid, list(range(max(0, mid - half), min(n_slices, mid + half + 1)))
    if how == "2.5d":
        return mid, [max(0, mid - half), mid, min(n_slices - 1, mid + half)]
    raise ValueError(f"unknown 3D reduction {how!r}")


def reduce_volume(volume: np.ndarray, z_spacing: float, how: str, slab_mm: float) -> np.ndarray:
    """(z, y, x) → (C, y, x): C=1 for ``key_slice`` and ``mip``, 3 for ``2.5d``; around the middle slice."""
    _, picks = reduction_slices(volume.shape[0], z_spacing, how, slab_mm)
    if how == "mip":
        return volume[picks].max(axis=0)[None]
    return volume[picks]


def window(values: np.ndarray, choice: str, image: Image, percentiles: tuple[float, float],
           dataset_range: tuple[float, float] | None = None) -> np.ndarray:
    """Physical values → [0, 1] by the VOI ``choice``; MONOCHROME1 inverted afterwards.

    ``dataset_range`` is the (low, high) the fingerprint holds for this image's modality and site,
    used by ``dataset_percentile`` (without it, the image's own percentiles are used).
    """
    if choice in WINDOW_PRESETS:
        centre, width = WINDOW_PRESETS[choice]
    elif choice == "dataset_percentile" and dataset_range is not None:
        centre, width = (dataset_range[0] + dataset_range[1]) / 2, max(dataset_range[1] - dataset_range[0], 1e-6)
    elif choice == "instance" and image.window is not None:
        centre, width = image.window
    else:  # percentile, or an instance window the file does not have
        lo, hi = np.percentile(values, percentiles)
        centre, width = (lo + hi) / 2, max(hi - lo, 1e-6)
    out = np.clip((values - (centre - width / 2)) / width, 0.0, 1.0)
    if image.photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


@dataclass(frozen=True)
class FitBox:
    """Where :func:`fit` puts an (H, W) plane in the (size, size) output.

    Attributes:
        scale: output pixels per mm (the same along both axes: output pixels are square in mm).
        new_h, new_w: the resized plane's size in output pixels.
        top, left: its offset in the output (the centred zero padding), pixels.
        h, w: the input plane's size in pixels.
    """

    scale: float
    new_h: int
    new_w: int
    top: int
    left: int
    h: int
    w: int

    def map(self, row: float, col: float) -> tuple[float, float]:
        """An input pixel coordinate (0-based, pixel centres) → the output's, as the bilinear resize maps it."""
        return ((row + 0.5) * self.new_h / self.h - 0.5 + self.top,
                (col + 0.5) * self.new_w / self.w - 0.5 + self.left)


def fit_box(h: int, w: int, spacing_xy: tuple[float, float], size: int) -> FitBox:
    """The geometry of :func:`fit` for an (h, w) plane with ``spacing_xy`` = (x, y) mm per pixel."""
    height_mm, width_mm = h * spacing_xy[1], w * spacing_xy[0]
    scale = size / max(height_mm, width_mm)
    new_h, new_w = max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))
    return FitBox(scale, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2, h, w)


def fit(channels_first: np.ndarray, spacing_xy: tuple[float, float], size: int) -> np.ndarray:
    """(C, H, W) → (C, size, size): physical aspect kept, longest side = size, zero padding centred."""
    c, h, w = channels_first.shape
    box = fit_box(h, w, spacing_xy, size)
    tensor = torch.from_numpy(np.ascontiguousarray(channels_first))[None]
    resized = torch.nn.functional.interpolate(tensor, size=(box.new_h, box.new_w), mode="bilinear",
                                              align_corners=False, antialias=True)[0].numpy()
    out = np.zeros((c, size, size), dtype=np.float32)
    out[:, box.top:box.top + box.new_h, box.left:box.left + box.new_w] = np.clip(resized, 0.0, 1.0)
    return out


@dataclass(frozen=True)
class LesionMark:
    """One ground-truth lesion cross-section on one instance (a row of ingest's ``lesions.parquet``).

    Attributes:
        row, col: centre in the instance's stored pixel grid (0-based; rows = y, columns = x).
        radius_mm: in-plane radius on that instance, mm (for a CT slice: the sphere's cross-section there).
        radius_px: the same in the instance's pixels; preferred on square pixels (see :func:`_mark_radius_mm`).
        position: the instance's ImagePositionPatient (mm, LPS); volumes only.
        orientation: its ImageOrientationPatient (row direction, then column direction); volumes only.
        pixel_spacing: its PixelSpacing (row, column) mm; volumes only.
    """

    row: float
    col: float
    radius_mm: float
    radius_px: float = float("nan")
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, float] | None = None


def lesion_in_tensor(marks: list[LesionMark], image: Image, params: PreprocessParams) -> tuple[float, float, float] | None:
    """Where a lesion lies in :func:`to_tensor`'s output: the pixels' geometry applied to a point.

    2D images: the mark's (row, col) through :func:`fit` (aspect-kept resize, centred padding); the
    radius in mm times the output's pixels per mm. Volumes (``image`` as :func:`read_volume` returns it:
    LPS, resampled): the marks of the lesion's slices (one or more cross-sections of a sphere) give
    the sphere's centre and radius in mm (a least-squares fit of r² + d² = R² along the slice normal;
    one mark: the sphere is centred on that slice); its centre goes to the resampled grid's continuous
    index, and then to the plane :func:`reduce_volume` makes: ``key_slice`` and ``2.5d`` (the centre
    channel is the key slice) keep the lesion only if the sphere cuts the key slice, with the
    cross-section's radius there; ``mip`` keeps it if it cuts the slab, with the largest cross-section
    inside the slab (a bright nodule's footprint in the projection).

    Args:
        marks: the cross-sections of ONE lesion (one mark for a 2D image).
        image: the image the tensor is made from (spacing/origin/direction as :class:`Image` holds them).
        params: the preprocess params the tensor is made with.

    Returns:
        (row, col, radius) in output-tensor pixels, or None when the lesion is not in the output plane.
    """
    if not marks:
        return None
    if image.array.ndim == 2:
        mark = marks[0]
        box = fit_box(*image.array.shape, (image.spacing[0], image.spacing[1]), params.size)
        radius_mm = _mark_radius_mm(mark, (image.spacing[1], image.spacing[0]))
        return (*box.map(mark.row, mark.col), radius_mm * box.scale)
    centre_mm, radius_mm = _sphere(marks)
    direction = np.asarray(image.direction, dtype=float).reshape(3, 3)
    spacing = np.asarray(image.spacing, dtype=float)
    index = direction.T @ (centre_mm - np.asarray(image.origin, dtype=float)) / spacing  # continuous (x, y, z)
    mid, picks = reduction_slices(image.array.shape[0], spacing[2], params.reduce_3d, params.slab_mm)
    if params.reduce_3d == "mip":
        nearest = float(np.clip(index[2], min(picks), max(picks)))
    else:
        nearest = float(mid)
    offset_mm = (nearest - index[2]) * spacing[2]
    if abs(offset_mm) >= radius_mm:
        return None
    box = fit_box(image.array.shape[1], image.array.shape[2], (spacing[0], spacing[1]), params.size)
    return (*box.map(index[1], index[0]), float(np.sqrt(radius_mm ** 2 - offset_mm ** 2)) * box.scale)


def _mark_radius_mm(mark: LesionMark, pixel_spacing: tuple[float, float]) -> float:
    """A mark's radius in the mm of the grid's own ``pixel_spacing`` (row, column).

    On square pixels the radius in pixels is used: it is what the pixels show, whatever "mm" means
    for the file (a radiograph's ImagerPixelSpacing is at the detector, a sidecar's mm may be at the
    patient, a magnification apart). On non-square pixels a radius in pixels is ambiguous, so the
    radius in mm is used; either falls back to the other when missing.
    """
    square = abs(pixel_spacing[0] - pixel_spacing[1]) <= 1e-6 * max(pixel_spacing)
    if np.isfinite(mark.radius_px) and (square or not np.isfinite(mark.radius_mm)):
        return float(mark.radius_px * np.sqrt(pixel_spacing[0] * pixel_spacing[1]))
    return float(mark.radius_mm)


def _mark_point(mark: LesionMark) -> tuple[np.ndarray, np.ndarray]:
    """A volume slice's mark in patient space: (centre, slice normal), mm and unit vector (LPS)."""
    if mark.position is None or mark.orientation is None or mark.pixel_spacing is None:
        raise PreprocessError("lesion mark on a volume slice without position/orientation/spacing")
    row_dir, col_dir = np.asarray(mark.orientation[:3], float), np.asarray(mark.orientation[3:6], float)
    # DICOM: column index steps along the row direction by the column spacing, and vice versa
    point = (np.asarray(mark.position, float) + mark.col * mark.pixel_spacing[1] * row_dir
             + mark.row * mark.pixel_spacing[0] * col_dir)
    return point, np.cross(row_dir, col_dir)


def _sphere(marks: list[LesionMark]) -> tuple[np.ndarray, float]:
    """Centre (mm, LPS) and radius (mm) of a sphere from its cross-sections on parallel slices."""
    points, distances, radii = [], [], []
    for mark in marks:
        point, normal = _mark_point(mark)
        points.append(point)
        distances.append(float(normal @ point))
        radii.append(_mark_radius_mm(mark, mark.pixel_spacing))
    points, d, r = np.array(points), np.array(distances), np.array(radii)
    if len(marks) == 1 or np.ptp(d) < 1e-6:
        best = int(np.argmax(r))
        return points[best], float(r[best])
    # r² + (d - d0)² = R²  ⇔  r² + d² = (R² - d0²) + 2 d0 d: linear in (R² - d0², d0)
    design = np.stack([np.ones_like(d), 2 * d], axis=1)
    (c, d0), *_ = np.linalg.lstsq(design, r ** 2 + d ** 2, rcond=None)
    radius = float(np.sqrt(max(c + d0 ** 2, float((r ** 2).max()))))
    # every cross-section's centre lies on the line through the sphere's centre along the normal
    on_line = points - np.outer(d, normal)
    return on_line.mean(axis=0) + d0 * normal, radius


def load_unit(row: dict, ingest_dir: Path, params: PreprocessParams) -> Image:
    paths = [ingest_dir / p for p in row["paths"]]
    if row["unit"] == "volume":
        return read_volume(paths, params.spacing_mm)
    if row["unit"] == "multiframe":
        raise PreprocessError(f"multi-frame instance ({row['frames']} frames): not supported yet")
    return read_2d(paths[0])


def to_tensor(image: Image, modality: str, params: PreprocessParams,
              dataset_range: tuple[float, float] | None = None) -> np.ndarray:
    """Image → (channels, size, size) float32 in [0, 1]."""
    if image.array.ndim == 3:
        planes = reduce_volume(image.array, image.spacing[2], params.reduce_3d, params.slab_mm)
    else:
        planes = image.array[None]
    choice = params.window_for(modality)
    windowed = np.stack([window(p, choice, image, params.percentiles, dataset_range) for p in planes])
    tensor = fit(windowed, (image.spacing[0], image.spacing[1]), params.size)
    if params.channels == 3 and tensor.shape[0] == 1:
        tensor = np.repeat(tensor, 3, axis=0)
    elif params.channels == 1 and tensor.shape[0] == 3:
        tensor = tensor[1:2]  # the key slice of a 2.5D stack
    return tensor


# --------------------------------------------------------------------------------------------------
# the stage

_WORK: tuple[Path, PreprocessParams, dict[str, tuple[float, float]]] | None = None


def _group(row: dict) -> str:
    return f"{row['modality']}|{row['site']}"


def _init(ingest_dir: Path, params: PreprocessParams, ranges: dict[str, tuple[float, float]] | None = None,
          parallel: bool = True) -> None:
    global _WORK
    _WORK = (ingest_dir, params, ranges or {})
    if parallel:  # parallelism comes from the fan-out: no thread oversubscription inside
        torch.set_num_threads(1)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _one(row: dict) -> tuple[np.ndarray | None, str, dict]:
    assert _WORK is not None
    ingest_dir, params, ranges = _WORK
    try:
        image = load_unit(row, ingest_dir, params)
        tensor = to_tensor(image, row["modality"], params, ranges.get(_group(row)))
    except PreprocessError as exc:
        return None, str(exc), {}
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
        return None, f"could not be preprocessed ({type(exc).__name__})", {}  # reasons never quote messages or paths
    try:
        # ground truth never decides whether an image is kept: a lesion that cannot be mapped is dropped alone
        lesions, unmapped = _lesions_of(row, image, ingest_dir, params), 0
    except Exception:  # noqa: BLE001 - counted in the summary; the image stays
        lesions, unmapped = [], 1
    sample = image.array.ravel()[:: max(1, image.array.size // 4096)]
    stats = {"spacing": [float(s) for s in image.spacing], "sample": sample.astype(np.float32), "lesions": lesions,
             "lesions_unmapped": unmapped}
    return tensor.astype(np.float16), "", stats


def _lesions_of(row: dict, image: Image, ingest_dir: Path, params: PreprocessParams) -> list[tuple[float, float, float]]:
    """The ground-truth lesions of one manifest row (``row["lesions"]``: ingest's lesions.parquet rows)
    as (row, col, radius) in tensor pixels; lesions outside the tensor's plane are left out."""
    records = row.get("lesions") or []
    if not records:
        return []
    if image.array.ndim == 2:
        found = [lesion_in_tensor([LesionMark(r["row"], r["col"], r["radius_mm"], r["radius_px"])], image, params)
                 for r in records]
        return [f for f in found if f is not None]
    marks = []
    for r in records:
        ds = pydicom.dcmread(ingest_dir / row["paths"][int(r["slice_index"])], stop_before_pixels=True)
        marks.append(LesionMark(r["row"], r["col"], r["radius_mm"], r["radius_px"],
                                tuple(float(v) for v in ds.ImagePositionPatient),
                                tuple(float(v) for v in ds.ImageOrientationPatient),
                                tuple(float(v) for v in ds.PixelSpacing)))
    found = [lesion_in_tensor(group, image, params) for group in _one_lesion_each(marks)]
    return [f for f in found if f is not None]


def _one_lesion_each(marks: list[LesionMark]) -> list[list[LesionMark]]:
    """Cross-sections grouped into lesions: a mark joins a lesion whose centre line (along the slice
    normal) passes within the larger of their radii; the sidecar has one row per slice, not per lesion."""
    groups: list[tuple[np.ndarray, float, list[LesionMark]]] = []
    for mark in marks:
        point, normal = _mark_point(mark)
        on_line = point - (normal @ point) * normal
        radius_mm = _mark_radius_mm(mark, mark.pixel_spacing)
        for k, (line, radius, members) in enumerate(groups):
            if np.linalg.norm(on_line - line) <= max(radius, radius_mm):
                members.append(mark)
                groups[k] = (line, max(radius, radius_mm), members)
                break
        else:
            groups.append((on_line, radius_mm, [mark]))
    return [members for _, _, members in groups]


@dataclass
class PreprocessSummary:
    images: int
    rejected: int
    shape: list[int]
    by_label: dict[str, int]
    seconds: float
    lesions: dict[str, int] = field(default_factory=dict)  # ground truth: images with it, lesions in the tensors


def run(params: PreprocessParams, ingest_dir: Path, out_dir: Path,
        fanout: FanoutParams | None = None) -> PreprocessSummary:
    """Preprocess every manifest row of ``ingest_dir`` into ``out_dir`` (see the module docstring).

    ``fanout`` says where the per-image work runs (default: local processes, ``params.workers`` of
    them); outputs do not depend on it.
    """
    fanout = fanout or FanoutParams()
    started = time.perf_counter()
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    manifest = pd.read_parquet(ingest_dir / "manifest.parquet")
    if manifest.empty:
        raise PreprocessInputError(f"{ingest_dir / 'manifest.parquet'}: no images to preprocess (every file was "
                                   f"rejected at ingest: see {ingest_dir / 'rejected.csv'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # what a killed run left
    rows = manifest.to_dict("records")
    ground_truth = _read_lesions(ingest_dir / "lesions.parquet")
    for r in rows:
        r["lesions"] = ground_truth.get(r["image_id"], [])
    shape = (len(rows), params.channels, params.size, params.size)
    tmp = out_dir / ".tensors.npy.tmp"
    tensors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    parallel = not fanout.is_inline(params.workers)
    ranges = _dataset_ranges(rows, ingest_dir, params, fanout)
    kept: list[int] = []
    rejected: list[tuple[str, str]] = []
    spacings: dict[str, list] = {}
    samples: dict[str, list] = {}
    lesion_rows: list[tuple] = []
    unmapped = 0
    results = map_ordered(_one, rows, init=_init, init_args=(ingest_dir, params, ranges, parallel), params=fanout,
                          workers=params.workers, desc="preprocess", unit="image")
    for i, (tensor, reason, stats) in enumerate(results):
        if tensor is None:
            rejected.append((rows[i]["image_id"], reason))
            continue
        tensors[len(kept)] = tensor
        lesion_rows += [(len(kept), rows[i]["image_id"], *lesion) for lesion in stats["lesions"]]
        unmapped += stats["lesions_unmapped"]
        kept.append(i)
        modality = rows[i]["modality"]
        spacings.setdefault(modality, []).append(stats["spacing"])
        samples.setdefault(modality, []).append(stats["sample"])
    tensors.flush()
    del tensors
    _finish_array(tmp, out_dir / "tensors.npy", len(kept), shape)

    index = manifest.iloc[kept][["image_id", "patient_key", "study_uid", "series_uid", "label", "modality", "site",
                                 "manufacturer", "unit"]].reset_index(drop=True)
    index.insert(0, "row", np.arange(len(index)))
    buffer = io.BytesIO()
    index.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "index.parquet", buffer.getvalue())
    lesions = pd.DataFrame(lesion_rows, columns=list(LESION_COLUMNS)).astype(
        {"row": "int64", "centre_row": "float64", "centre_col": "float64", "radius_px": "float64"})
    buffer = io.BytesIO()
    lesions.to_parquet(buffer, index=False)
    atomic_write_bytes(out_dir / "lesions.parquet", buffer.getvalue())
    atomic_write_text(out_dir / "rejected.csv", csv_text(["image_id", "reason"], sorted(rejected)))
    fingerprint = {
        "images": len(index),
        "tensor": {"file": "tensors.npy", "shape": [len(index), *shape[1:]], "dtype": "float16", "range": [0, 1],
                   "layout": "N, C, H, W"},
        "params": asdict(params),
        "labels": dict(sorted(Counter(index["label"]).items())),
        "sites": dict(sorted(Counter(index["site"]).items())),
        "modalities": {
            m: {"images": len(spacings[m]),
                "median_spacing_mm": [round(float(v), 4) for v in np.median(np.array([s[:2] for s in spacings[m]]), 0)],
                "intensity_percentiles": dict(zip(["p0.5", "p5", "p50", "p95", "p99.5"],
                                                  [round(float(v), 2) for v in np.percentile(
                                                      np.concatenate(samples[m]), [0.5, 5, 50, 95, 99.5])]))}
            for m in sorted(spacings)
        },
        "dataset_windows": {group: [round(lo, 3), round(hi, 3)] for group, (lo, hi) in sorted(ranges.items())},
        "rejected": len(rejected),
    }
    atomic_write_text(out_dir / "fingerprint.json", json.dumps(fingerprint, indent=2) + "\n")
    summary = PreprocessSummary(images=len(index), rejected=len(rejected), shape=[len(index), *shape[1:]],
                                by_label=fingerprint["labels"], seconds=round(time.perf_counter() - started, 2),
                                lesions=_lesion_counts(rows, kept, ground_truth, lesions, unmapped))
    atomic_write_text(out_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    log.info("preprocess: %d images → %s, %d rejected, %.1fs", summary.images, summary.shape, summary.rejected,
             summary.seconds)
    return summary


def _read_lesions(path: Path) -> dict[str, list[dict]]:
    """Ingest's lesion ground truth by image_id (empty when the file is absent or has no rows)."""
    if not path.exists():
        return {}
    table = pd.read_parquet(path)
    return {image_id: group.to_dict("records") for image_id, group in table.groupby("image_id", sort=False)}


def _lesion_counts(rows: list[dict], kept: list[int], ground_truth: dict[str, list[dict]],
                   lesions: pd.DataFrame, unmapped: int) -> dict[str, int]:
    if not ground_truth:
        return {}
    with_truth = sum(1 for i in kept if rows[i]["image_id"] in ground_truth)
    if unmapped:
        log.warning("preprocess: the lesion ground truth of %d image(s) could not be mapped (images kept)", unmapped)
    return {"images_with_ground_truth": with_truth, "images_with_lesion_in_tensor": int(lesions["row"].nunique()),
            "lesions_in_tensor": len(lesions), "images_ground_truth_unmapped": unmapped}


def _sample_values(row: dict) -> np.ndarray | None:
    assert _WORK is not None
    ingest_dir, params, _ = _WORK
    try:
        image = load_unit(row, ingest_dir, params)
    except Exception:  # noqa: BLE001 - the main pass reports it
        return None
    values = image.array.ravel()
    return values[:: max(1, values.size // 20000)].astype(np.float32)


def _dataset_ranges(rows: list[dict], ingest_dir: Path, params: PreprocessParams,
                    fanout: FanoutParams) -> dict[str, tuple[float, float]]:
    """First pass for ``dataset_percentile``: percentiles of physical values per (modality, site)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if params.window_for(row["modality"]) == "dataset_percentile":
            groups.setdefault(_group(row), []).append(row)
    if not groups:
        return {}
    sample = []
    for group_rows in groups.values():  # evenly spaced, deterministic
        picks = np.linspace(0, len(group_rows) - 1, min(len(group_rows), params.fingerprint_sample)).round()
        sample += [group_rows[int(i)] for i in np.unique(picks)]
    values = list(map_ordered(_sample_values, sample, init=_init,
                              init_args=(ingest_dir, params, None, not fanout.is_inline(params.workers)),
                              params=fanout, workers=params.workers, desc="fingerprint", unit="image"))
    pooled: dict[str, list[np.ndarray]] = {}
    for row, vals in zip(sample, values):
        if vals is not None:
            pooled.setdefault(_group(row), []).append(vals)
    ranges = {}
    for group, chunks in pooled.items():
        lo, hi = np.percentile(np.concatenate(chunks), params.percentiles)
        ranges[group] = (float(lo), float(hi))
    return ranges


def _finish_array(tmp: Path, final: Path, n_kept: int, shape: tuple[int, ...]) -> None:
    """Rename the memmap into place; if images were rejected, shrink it to the kept rows first."""
    if n_kept == shape[0]:
        os.replace(tmp, final)
        return
    source = np.load(tmp, mmap_mode="r")
    shrunk_tmp = final.with_name(".tensors.shrunk.tmp")
    shrunk = np.lib.format.open_memmap(shrunk_tmp, mode="w+", dtype=np.float16, shape=(n_kept, *shape[1:]))
    for start in range(0, n_kept, 256):
        shrunk[start:start + 256] = source[start:start + 256]
    shrunk.flush()
    del shrunk, source
    os.replace(shrunk_tmp, final)
    tmp.unlink()
