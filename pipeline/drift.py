"""Drift signal: do new images look like the ones the model was trained on?

Train records, per modality, the deciles of two statistics of its training tensors (the model's actual
inputs, after windowing and resizing): each image's mean intensity and its standard deviation
(``reference``; in the model card's ``data.drift_reference``). Predict computes the same statistics on
the new batch and the population stability index (PSI) of each against the reference deciles:
``sum((p_new - p_ref) * ln(p_new / p_ref))`` over the ten decile bins, where ``p_ref`` is 0.1 per
bin. Conventional reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a shift
(``predict.drift_psi`` sets the flag level). A finite batch has a PSI above zero by chance alone,
about ``(bins - 1) * (1/n_new + 1/n_ref)`` (0.15 for 60 new images: the chi-square approximation), so
the status is read from the PSI minus that chance level; both are reported. A modality with fewer than ``MIN_IMAGES`` new images is
reported as too small to tell; one the model never saw is flagged as such.

Statistics of the windowed tensors see what changes the model's input (a CT calibration offset moves
HU against the fixed lung window); a gain change that per-image percentile windowing cancels is,
correctly, no drift for the model.
"""

from __future__ import annotations

import numpy as np

STATISTICS = ("mean", "std")
MIN_IMAGES = 20
_EPS = 1e-4  # proportion floor: an empty bin would make the index infinite


def image_statistics(tensors: np.ndarray, rows: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    """Per-image mean and standard deviation of ``tensors[rows]`` (any float dtype, memmaps read in chunks)."""
    rows = np.asarray(rows, np.int64)
    means, stds = np.empty(len(rows)), np.empty(len(rows))
    for start in range(0, len(rows), chunk):
        flat = np.asarray(tensors[rows[start:start + chunk]], dtype=np.float32).reshape(-1, int(np.prod(tensors.shape[1:])))
        means[start:start + chunk], stds[start:start + chunk] = flat.mean(1), flat.std(1)
    return {"mean": means, "std": stds}


def reference(tensors: np.ndarray, rows: np.ndarray, modalities: np.ndarray) -> dict[str, dict]:
    """Per modality: image count and the deciles (11 values, min to max) of each statistic."""
    stats = image_statistics(tensors, rows)
    modalities = np.asarray(modalities).astype(str)
    out = {}
    for modality in sorted(set(modalities)):
        mask = modalities == modality
        out[modality] = {"images": int(mask.sum()),
                         **{name: [round(float(v), 6) for v in np.quantile(stats[name][mask], np.linspace(0, 1, 11))]
                            for name in STATISTICS}}
    return out


def psi(deciles: list[float], values: np.ndarray) -> float:
    """Population stability index of ``values`` against the reference ``deciles`` (10 equal-mass bins)."""
    edges = np.asarray(deciles, float)
    inner = edges[1:-1]  # the outer bins are open: values beyond the training range land in them
    counts = np.bincount(np.searchsorted(inner, np.asarray(values, float), side="right"), minlength=10)
    observed = np.maximum(counts / max(len(values), 1), _EPS)
    expected = 0.1
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def chance_psi(n_new: int, n_reference: int, bins: int = 10) -> float:
    """The PSI two samples of these sizes from one distribution have on average (chi-square approximation)."""
    return (bins - 1) * (1 / max(n_new, 1) + 1 / max(n_reference, 1))


def compare(ref: dict[str, dict], tensors: np.ndarray, rows: np.ndarray, modalities: np.ndarray,
            flag_at: float = 0.25) -> dict:
    """Drift of a new batch against ``ref`` (:func:`reference`): per modality, PSI of each statistic.

    Returns:
        ``{"flag": bool, "flag_at": float, "modalities": {modality: {"images", "psi": {stat: value},
        "status"}}}`` with status ``stable`` / ``moderate`` / ``shift`` / ``unseen`` (not in the
        reference) / ``too few images``; ``flag`` is True when any modality shifted or is unseen.
    """
    stats = image_statistics(tensors, rows)
    modalities = np.asarray(modalities).astype(str)
    result: dict = {"flag": False, "flag_at": flag_at, "modalities": {}}
    for modality in sorted(set(modalities)):
        mask = modalities == modality
        modality = str(modality)
        entry: dict = {"images": int(mask.sum())}
        if modality not in ref:
            entry["status"] = "unseen"
        elif mask.sum() < MIN_IMAGES:
            entry["status"] = "too few images"
        else:
            entry["psi"] = {name: round(psi(ref[modality][name], stats[name][mask]), 4) for name in STATISTICS}
            entry["psi_by_chance"] = round(chance_psi(int(mask.sum()), int(ref[modality]["images"])), 4)
            worst = max(entry["psi"].values()) - entry["psi_by_chance"]
            entry["status"] = "shift" if worst > flag_at else "moderate" if worst > 0.1 else "stable"
        result["flag"] |= entry["status"] in ("shift", "unseen")
        result["modalities"][modality] = entry
    return result


def summary_line(result: dict | None) -> str:
    """One line for logs and artifacts."""
    if not result:
        return "drift: no reference in the model card (trained before drift references)"
    parts = []
    for modality, entry in result["modalities"].items():
        values = entry.get("psi")
        shown = (", ".join(f"PSI {k} {v:.2f}" for k, v in values.items()) + f"; by chance {entry['psi_by_chance']:.2f}"
                 if values else "")
        parts.append(f"{modality} {entry['status']}" + (f" ({shown})" if shown else "") + f", {entry['images']} images")
    verdict = "SHIFT FLAGGED" if result["flag"] else "no shift flagged"
    return f"drift: {verdict} (flag at PSI > {result['flag_at']:g}): " + "; ".join(parts)

