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

from pipeline.fanout import FanoutParams, map_ordered
from pipeline.io_utils import atomic_write_bytes, atomic_write_text, csv_text

log = logging.getLogger(__name__)

#: (centre, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "bone": (400.0, 1800.0),
}
REDUCTIONS = ("key_slice", "2.5d", "mip")


class PreprocessError(ValueError):
    """An image unit that cannot be turned into a tensor; the message is the rejection reason."""


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
        workers: processes (or threads, or local Dask workers: see ``fanout``); 0 = one per core, 1 = in
            this process.
    """

    size: int = 224
    channels: int = 3
    reduce_3d: str = "key_slice"
    slab_mm: float = 10.0
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 2.5)
    window: dict[str, str] = field(default_factory=lambda: {"CT": "lung", "default": "percentile"})
    percentiles: tuple[float, float] = (0.5, 99.5)
    fingerprint_sample: int = 32
    workers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_mm", tuple(float(s) for s in self.spacing_mm))
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.reduce_3d not in REDUCTIONS:
            raise ValueError(f"preprocess.reduce_3d must be one of {REDUCTIONS}, got {self.reduce_3d!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"preprocess.channels must be 1 or 3, got {self.channels}")
        for modality, choice in self.window.items():
            if choice not in (*WINDOW_PRESETS, "instance", "percentile", "dataset_percentile"):
                raise ValueError(f"preprocess.window[{modality}]: unknown window {choice!r}; presets are "
                                 f"{sorted(WINDOW_PRESETS)}, or 'instance' / 'percentile' / 'dataset_percentile'")

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
        raise PreprocessError(f"pixel data does not decode ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
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
    except RuntimeError as exc:
        raise PreprocessError(f"series cannot be read as a volume ({' '.join(str(exc).split())[-200:]})")
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


def reduce_volume(volume: np.ndarray, z_spacing: float, how: str, slab_mm: float) -> np.ndarray:
    """(z, y, x) → (C, y, x): C=1 for ``key_slice`` and ``mip``, 3 for ``2.5d``; around the middle slice."""
    mid = volume.shape[0] // 2
    half = max(1, int(round(slab_mm / 2 / z_spacing)))
    if how == "key_slice":
        return volume[mid][None]
    if how == "mip":
        lo, hi = max(0, mid - half), min(volume.shape[0], mid + half + 1)
        return volume[lo:hi].max(axis=0)[None]
    if how == "2.5d":
        picks = [max(0, mid - half), mid, min(volume.shape[0] - 1, mid + half)]
        return volume[picks]
    raise ValueError(f"unknown 3D reduction {how!r}")


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


def fit(channels_first: np.ndarray, spacing_xy: tuple[float, float], size: int) -> np.ndarray:
    """(C, H, W) → (C, size, size): physical aspect kept, longest side = size, zero padding centred."""
    c, h, w = channels_first.shape
    height_mm, width_mm = h * spacing_xy[1], w * spacing_xy[0]
    scale = size / max(height_mm, width_mm)
    new_h, new_w = max(1, int(round(height_mm * scale))), max(1, int(round(width_mm * scale)))
    tensor = torch.from_numpy(np.ascontiguousarray(channels_first))[None]
    resized = torch.nn.functional.interpolate(tensor, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                              antialias=True)[0].numpy()
    out = np.zeros((c, size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[:, top:top + new_h, left:left + new_w] = np.clip(resized, 0.0, 1.0)
    return out


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
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}", {}
    sample = image.array.ravel()[:: max(1, image.array.size // 4096)]
    stats = {"spacing": [float(s) for s in image.spacing], "sample": sample.astype(np.float32)}
    return tensor.astype(np.float16), "", stats


@dataclass
class PreprocessSummary:
    images: int
    rejected: int
    shape: list[int]
    by_label: dict[str, int]
    seconds: float


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
        raise ValueError(f"{ingest_dir / 'manifest.parquet'}: no images to preprocess")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = manifest.to_dict("records")
    shape = (len(rows), params.channels, params.size, params.size)
    tmp = out_dir / ".tensors.npy.tmp"
    tensors = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    parallel = not fanout.is_inline(params.workers)
    ranges = _dataset_ranges(rows, ingest_dir, params, fanout)
    kept: list[int] = []
    rejected: list[tuple[str, str]] = []
    spacings: dict[str, list] = {}
    samples: dict[str, list] = {}
    results = map_ordered(_one, rows, init=_init, init_args=(ingest_dir, params, ranges, parallel), params=fanout,
                          workers=params.workers, desc="preprocess", unit="image")
    for i, (tensor, reason, stats) in enumerate(results):
        if tensor is None:
            rejected.append((rows[i]["image_id"], reason))
            continue
        tensors[len(kept)] = tensor
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
                                by_label=fingerprint["labels"], seconds=round(time.perf_counter() - started, 2))
    atomic_write_text(out_dir / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
    log.info("preprocess: %d images → %s, %d rejected, %.1fs", summary.images, summary.shape, summary.rejected,
             summary.seconds)
    return summary


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
