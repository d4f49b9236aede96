"""Lesion ground truth in tensor coordinates, and how well Grad-CAM finds it.

Preprocess writes ``lesions.parquet`` beside the tensors (:data:`pipeline.preprocess.LESION_COLUMNS`:
tensor ``row``, ``image_id``, ``centre_row``, ``centre_col``, ``radius_px`` in tensor pixels) when ingest
was given a lesion sidecar. It is never a label: evaluate reads it only for the localisation hit rate,
the share of true-positive test images whose Grad-CAM maximum lies inside a ground-truth lesion.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import metrics

FILE = "lesions.parquet"


def read(images_dir: Path) -> pd.DataFrame | None:
    """``images_dir/lesions.parquet``, or None when it is absent or holds no lesion (no ground truth)."""
    path = Path(images_dir) / FILE
    if not path.exists():
        return None
    table = pd.read_parquet(path)
    return table if len(table) else None


def peaks(maps: np.ndarray) -> np.ndarray:
    """(N, 2) (row, col) of each (H, W) map's maximum (the first one in row-major order on ties)."""
    if not len(maps):
        return np.zeros((0, 2), dtype=np.int64)
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=1)


def hits(maps: np.ndarray, rows: np.ndarray, lesions: pd.DataFrame, tolerance_px: float = 0.0) -> np.ndarray:
    """Whether each map's maximum lies inside a lesion of its image.

    Args:
        maps: (N, H, W) Grad-CAM maps at tensor resolution. A flat map (all zeros: no place preferred)
            peaks at (0, 0) and so counts as a miss unless a lesion covers that corner.
        rows: (N,) tensor rows the maps belong to.
        lesions: the lesions table; an image may have several lesions (inside any one is a hit).
        tolerance_px: a hit may lie this far outside the lesion (0: strictly inside). The pointing game
            allows half a cell of the Grad-CAM layer's grid: a map of stride 16 cannot place its
            maximum closer than that to a nodule a few pixels wide.

    Returns:
        (N,) bool: distance from a lesion centre to the maximum <= that lesion's radius (tensor pixels).
    """
    peak = peaks(maps)
    by_row = {row: group[["centre_row", "centre_col", "radius_px"]].to_numpy(float)
              for row, group in lesions.groupby("row")}
    out = np.zeros(len(rows), dtype=bool)
    for k, row in enumerate(rows):
        found = by_row.get(int(row))
        if found is not None:
            distance = np.hypot(found[:, 0] - peak[k, 0], found[:, 1] - peak[k, 1])
            out[k] = bool((distance <= found[:, 2] + tolerance_px).any())
    return out


def hit_rate(hit: np.ndarray, patient: np.ndarray, *, n_boot: int, seed: int, alpha: float) -> dict:
    """The share of hits with a percentile CI from the same patient bootstrap as the other metrics.

    Returns:
        ``{"hit_rate", "ci_low", "ci_high", "n_images", "n_hits", "n_patients", "ci_method"}``; the rate is
        None without images, the CI None with fewer than two patients.
    """
    hit = np.asarray(hit, dtype=float)
    patients = int(pd.Series(patient).nunique())
    result = {"hit_rate": float(hit.mean()) if len(hit) else None, "ci_low": None, "ci_high": None,
              "n_images": int(len(hit)), "n_hits": int(hit.sum()), "n_patients": patients,
              "ci_method": "patient bootstrap (percentile)"}
    if patients >= 2:
        boot = metrics.patient_bootstrap(hit, hit, patient, lambda y, _: float(np.mean(y)), n_boot=n_boot,
                                         seed=seed, alpha=alpha)
        lo, hi = boot["ci"]
        if not (math.isnan(lo) or math.isnan(hi)):
            result["ci_low"], result["ci_high"] = float(lo), float(hi)
    return result
