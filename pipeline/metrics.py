"""Evaluation metrics for a clinician-facing report of an image classifier.

Pure numpy / scikit-learn: no torch, no plotting, no file I/O. Every returned value is a plain Python
``float`` / ``int`` / ``list`` / ``dict`` so reports can be written with ``json.dumps``; undefined
quantities (a ratio 0/0, an AUC on one class) are ``float('nan')`` rather than exceptions.

Conventions: ``y_true`` is an int array of shape (n,) with 1 = positive; ``score`` is a float array of
shape (n,) holding the probability of the positive class (or (n, k) class probabilities for the
multi-class :func:`discrimination`); an image is predicted positive when ``score >= threshold``.

Several images may belong to one patient, so images are not independent: confidence intervals come
from :func:`patient_bootstrap`, which resamples patients, never single images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

THRESHOLD_METHODS: tuple[str, ...] = ("youden", "sensitivity")
MAX_CURVE_POINTS = 500  # keeps DVC plot files small; an evenly thinned curve looks the same

Statistic = Callable[[np.ndarray, np.ndarray], float]


def _binary_inputs(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """Validated copies of binary labels, shape (n,) int, and scores, shape (n,) float64."""
    y = np.asarray(y_true)
    s = np.asarray(score, dtype=float)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"y_true and score must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        raise ValueError("y_true and score are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1, got values {np.unique(y).tolist()}")
    return y.astype(int), s


def _has_both_classes(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def _require_both_classes(y: np.ndarray) -> None:
    if not _has_both_classes(y):
        raise ValueError(f"y_true holds a single class ({int(y[0])}); positives and negatives are both needed")


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def _defined_mean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def choose_threshold(y_true, score, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Pick an operating threshold on validation data.

    Args:
        y_true: (n,) int 0/1 labels, 1 = positive.
        score: (n,) float probability of the positive class.
        method: ``"youden"`` maximises sensitivity + specificity - 1 over the ROC thresholds (ties go to
            the highest threshold, i.e. the fewest positive calls); ``"sensitivity"`` takes the highest
            threshold whose sensitivity is at least ``target_sensitivity``.
        target_sensitivity: in (0, 1]; used by ``"sensitivity"`` only.

    Returns:
        The threshold as a float; the ROC curve's ``inf`` starting threshold is reported as 1.0.

    Raises:
        ValueError: on an unknown method, a target outside (0, 1], or single-class ``y_true``.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; allowed: {', '.join(THRESHOLD_METHODS)}")
    if method == "sensitivity" and not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    y, s = _binary_inputs(y_true, score)
    _require_both_classes(y)
    # Every distinct score must be a candidate, or the chosen point could fall between kept ones.
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # Thresholds decrease along the curve, so the first index is the highest threshold.
    best = np.argmax(tpr - fpr) if method == "youden" else np.argmax(tpr >= target_sensitivity)
    return float(min(thresholds[best], 1.0))


def operating_point(y_true, score, threshold: float) -> dict:
    """Confusion-matrix metrics at a fixed threshold (predicted positive if ``score >= threshold``).

    Args:
        y_true: (n,) int 0/1 labels.
        score: (n,) float positive-class probability.
        threshold: decision threshold.

    Returns:
        ``threshold, sensitivity, specificity, ppv, npv, f1, accuracy, balanced_accuracy`` (floats, nan when
        the denominator is 0; ``balanced_accuracy`` is nan unless both sensitivity and specificity are
        defined), ``tp, fp, tn, fn`` (ints) and ``confusion_matrix`` as ``[[tn, fp], [fn, tp]]``.
    """
    y, s = _binary_inputs(y_true, score)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel())
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "threshold": float(threshold),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(y)),
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if _has_both_classes(y) else math.nan


def _pr_auc(y: np.ndarray, s: np.ndarray) -> float:
    # scikit-learn returns a number (with a warning) when there are no positives; it means nothing.
    return float(average_precision_score(y, s)) if _has_both_classes(y) else math.nan


def rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC-AUC as the Mann-Whitney U statistic (ties count 1/2), equal to ``roc_auc_score``.

    Args:
        y: (n,) int 0/1 labels, not validated.
        s: (n,) float scores.

    Returns:
        The AUC as a float; nan when ``y`` holds one class.

    Bootstrap loops use this instead of ``roc_auc_score``, whose input validation costs ~20x the
    arithmetic (about 4 ms a call on 1000 images with scikit-learn 1.9).
    """
    n_pos = int(y.sum())
    if not 0 < n_pos < len(y):
        return math.nan
    return float((rankdata(s)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def _binary_discrimination(y: np.ndarray, s: np.ndarray) -> dict:
    return {"auc": _auc(y, s), "pr_auc": _pr_auc(y, s)}


def discrimination(y_true, score) -> dict:
    """Threshold-free discrimination: ROC-AUC and PR-AUC (average precision).

    Args:
        y_true: (n,) int labels; 0/1 for binary, 0..k-1 for multi-class.
        score: (n,) float positive-class probability, or (n, k) float class scores for multi-class.

    Returns:
        Binary: ``{"auc", "pr_auc"}``, both nan if ``y_true`` holds one class. Multi-class: also
        ``"per_class": {str(c): {"auc", "pr_auc"}}`` one-vs-rest; ``auc`` and ``pr_auc`` are their macro
        means over the classes whose one-vs-rest problem is defined (a class absent from ``y_true`` is nan
        and left out).
    """
    s = np.asarray(score, dtype=float)
    if s.ndim != 2:
        return _binary_discrimination(*_binary_inputs(y_true, s))
    y = np.asarray(y_true)
    k = s.shape[1]
    if y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"y_true must be 1-D with one label per score row, got shapes {y.shape} and {s.shape}")
    if not np.isin(y, np.arange(k)).all():
        raise ValueError(f"y_true must hold class indices 0..{k - 1}, got values {np.unique(y).tolist()}")
    per_class = {str(c): _binary_discrimination((y == c).astype(int), s[:, c]) for c in range(k)}
    return {
        "auc": _defined_mean([m["auc"] for m in per_class.values()]),
        "pr_auc": _defined_mean([m["pr_auc"] for m in per_class.values()]),
        "per_class": per_class,
    }


def class_auc(y_true, probs) -> float:
    """ROC-AUC of class probabilities (n, k): of the last class for two classes, else the macro
    one-vs-rest mean of :func:`discrimination`; nan where undefined (one class present).

    Model selection on the validation split uses it, so training selects on the AUC evaluate reports.
    """
    probs = np.asarray(probs, dtype=float)
    return discrimination(y_true, probs[:, 1] if probs.shape[1] == 2 else probs)["auc"]


def calibration(y_true, score, n_bins: int = 10) -> dict:
    """Brier score, expected calibration error and the reliability curve.

    Bins are ``n_bins`` equal-width intervals over [0, 1], right-closed like
    ``sklearn.calibration.calibration_curve(strategy="uniform")`` (the first bin also holds 0), so the
    curve matches scikit-learn's.

    Args:
        y_true: (n,) int 0/1 labels.
        score: (n,) float positive-class probability in [0, 1].
        n_bins: number of bins, >= 1.

    Returns:
        ``{"brier", "ece", "curve"}``; ``ece`` is the count-weighted mean of
        ``|mean_predicted - fraction_positive|`` over bins; ``curve`` lists the non-empty bins as
        ``{"bin_lower", "bin_upper", "mean_predicted", "fraction_positive", "count"}``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, s = _binary_inputs(y_true, score)
    if s.min() < 0 or s.max() > 1:
        raise ValueError("calibration needs scores in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], s)
    count = np.bincount(bins, minlength=n_bins)
    score_sum = np.bincount(bins, weights=s, minlength=n_bins)
    positive_sum = np.bincount(bins, weights=y, minlength=n_bins)
    curve = [
        {
            "bin_lower": float(edges[b]),
            "bin_upper": float(edges[b + 1]),
            "mean_predicted": float(score_sum[b] / count[b]),
            "fraction_positive": float(positive_sum[b] / count[b]),
            "count": int(count[b]),
        }
        for b in np.flatnonzero(count)
    ]
    ece = sum(p["count"] * abs(p["mean_predicted"] - p["fraction_positive"]) for p in curve) / len(s)
    return {"brier": float(brier_score_loss(y, s)), "ece": float(ece), "curve": curve}


def _thin(n: int) -> np.ndarray:
    """Indices of at most MAX_CURVE_POINTS evenly spaced points out of n, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, MAX_CURVE_POINTS)).round().astype(int))


def roc_points(y_true, score) -> list[dict]:
    """ROC curve as ``[{"fpr", "tpr", "threshold"}]`` by decreasing threshold, at most 500 points.

    The curve's ``inf`` starting threshold is reported as 1.0 so the points are valid JSON.
    """
    y, s = _binary_inputs(y_true, score)
    _require_both_classes(y)
    fpr, tpr, thresholds = roc_curve(y, s)
    return [
        {"fpr": float(fpr[i]), "tpr": float(tpr[i]), "threshold": float(min(thresholds[i], 1.0))}
        for i in _thin(len(fpr))
    ]


def pr_points(y_true, score) -> list[dict]:
    """Precision-recall curve as ``[{"recall", "precision", "threshold"}]``, at most 500 points.

    Ordered by decreasing threshold (increasing recall), like :func:`roc_points`. scikit-learn's closing
    point (recall 0, precision 1) has no threshold; it is reported with threshold 1.0, the same
    "above every score" convention as the ROC curve.
    """
    y, s = _binary_inputs(y_true, score)
    _require_both_classes(y)
    precision, recall, thresholds = precision_recall_curve(y, s)
    thresholds = np.append(thresholds, 1.0)
    return [
        {"recall": float(recall[i]), "precision": float(precision[i]), "threshold": float(thresholds[i])}
        for i in _thin(len(recall))[::-1]
    ]


def patient_bootstrap(
    y_true,
    score,
    patient,
    statistic: Statistic,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Percentile confidence interval for ``statistic`` by resampling patients with replacement.

    All images of a drawn patient enter the resample together, once per draw, so the interval reflects
    the between-patient variability that per-image resampling would understate.

    Args:
        y_true: (n,) labels, passed to ``statistic`` row-subset.
        score: (n,) or (n, k) scores, passed to ``statistic`` row-subset.
        patient: (n,) patient identifiers (any hashable values).
        statistic: ``statistic(y_true_b, score_b) -> float``. A resample on which it raises ValueError or
            returns nan (e.g. only one class drawn) is skipped and counted.
        n_boot: number of resamples drawn, >= 1.
        seed: seed for ``numpy.random.default_rng``; equal seeds give equal results.
        alpha: the interval covers 1 - alpha.

    Returns:
        ``{"estimate": statistic on all data (nan if it raises ValueError), "ci": [lo, hi] (nan if every
        resample was skipped), "n_boot": resamples used, "n_skipped", "level": 1 - alpha}``.

    Raises:
        ValueError: on mismatched lengths, fewer than 2 patients, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    y = np.asarray(y_true)
    s = np.asarray(score)
    codes, uniques = pd.factorize(np.asarray(patient), use_na_sentinel=False)
    if not len(y) == len(s) == len(codes):
        raise ValueError(f"y_true, score and patient lengths differ: {len(y)}, {len(s)}, {len(codes)}")
    if len(uniques) < 2:
        raise ValueError(f"patient bootstrap needs at least 2 patients, got {len(uniques)}")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")

    def evaluate(idx: np.ndarray | slice) -> float:
        try:
            return float(statistic(y[idx], s[idx]))
        except ValueError:
            return math.nan

    values = np.asarray([evaluate(idx) for idx in _patient_resamples(codes, n_boot, seed)])
    used = values[~np.isnan(values)]
    ci = np.quantile(used, [alpha / 2, 1 - alpha / 2]).tolist() if len(used) else [math.nan, math.nan]
    return {
        "estimate": evaluate(slice(None)),
        "ci": [float(v) for v in ci],
        "n_boot": len(used),
        "n_skipped": int(n_boot - len(used)),
        "level": 1 - alpha,
    }


def _patient_resamples(codes: np.ndarray, n_boot: int, seed: int):
    """Row indices of ``n_boot`` resamples of patients (``codes``: 0..P-1 per row), with replacement."""
    # Rows grouped by patient once: patient p owns by_patient[start[p]:start[p] + size[p]].
    by_patient = np.argsort(codes, kind="stable")
    size = np.bincount(codes)
    start = np.cumsum(size) - size
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(size), len(size))
        lengths = size[drawn]
        # Each output position maps to (its patient's start) + (its offset within that patient's block).
        offsets = np.repeat(start[drawn] - (np.cumsum(lengths) - lengths), lengths)
        yield by_patient[offsets + np.arange(lengths.sum())]


def paired_auc_difference(
    y_true,
    scores_a,
    scores_b,
    patient,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """AUC of ``a`` minus AUC of ``b`` on the same images, with a paired patient-bootstrap interval.

    Each resample draws patients once and scores every model on it, so errors the models share on
    hard cases cancel: the interval of the difference is narrower than two independent intervals suggest.

    Args:
        y_true: (n,) int 0/1 labels.
        scores_a: (n,) or (n, k) scores; with k columns (e.g. one per seed) the AUC of ``a`` is the mean
            of the columns' AUCs.
        scores_b: (n,) or (n, m) scores of the other side, likewise.
        patient: (n,) patient identifiers.
        n_boot, seed, alpha: as in :func:`patient_bootstrap`.

    Returns:
        :func:`patient_bootstrap`'s dict: ``estimate`` (the difference on all data, nan on one-class
        ``y_true``), ``ci``, ``n_boot``, ``n_skipped``, ``level``.
    """
    a, b = (np.asarray(s, dtype=float) for s in (scores_a, scores_b))
    a, b = (s[:, None] if s.ndim == 1 else s for s in (a, b))
    k = a.shape[1]

    def difference(yb: np.ndarray, sb: np.ndarray) -> float:
        aucs = [rank_auc(yb, sb[:, i]) for i in range(sb.shape[1])]
        return float(np.mean(aucs[:k]) - np.mean(aucs[k:]))

    return patient_bootstrap(y_true, np.column_stack([a, b]), patient, difference, n_boot, seed, alpha)


def roc_band(y_true, score, patient, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
             grid_points: int = 101) -> list[dict]:
    """Pointwise patient-bootstrap band of the ROC curve: TPR and its interval at fixed FPRs.

    Returns:
        ``grid_points`` dicts ``{"fpr", "tpr", "tpr_lo", "tpr_hi"}`` for FPR evenly over [0, 1]; ``tpr``
        is the curve of all data, interpolated. Single-class resamples are skipped.
    """
    y, s = _binary_inputs(y_true, score)
    _require_both_classes(y)
    codes, _ = pd.factorize(np.asarray(patient), use_na_sentinel=False)
    grid = np.linspace(0, 1, grid_points)

    def tpr_on_grid(yb: np.ndarray, sb: np.ndarray) -> np.ndarray:
        fpr, tpr, _ = roc_curve(yb, sb)
        return np.interp(grid, fpr, tpr)

    curves = [tpr_on_grid(y[idx], s[idx]) for idx in _patient_resamples(codes, n_boot, seed)
              if _has_both_classes(y[idx])]
    lo, hi = np.quantile(np.asarray(curves), [alpha / 2, 1 - alpha / 2], axis=0)
    full = tpr_on_grid(y, s)
    return [{"fpr": float(f), "tpr": float(t), "tpr_lo": float(a), "tpr_hi": float(b)}
            for f, t, a, b in zip(grid, full, lo, hi)]


def _sensitivity_at(threshold: float) -> Statistic:
    return lambda y, s: _ratio(np.sum((s >= threshold) & (y == 1)), np.sum(y == 1))


def _specificity_at(threshold: float) -> Statistic:
    return lambda y, s: _ratio(np.sum((s < threshold) & (y == 0)), np.sum(y == 0))


def _json_scalar(value):
    """A pandas group key as a JSON-friendly Python value."""
    return value.item() if isinstance(value, np.generic) else value


def subgroup_table(
    frame: pd.DataFrame,
    by: list[str],
    y_col: str = "y_true",
    score_col: str = "score",
    patient_col: str = "patient",
    *,
    threshold: float,
    n_boot: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Per-subgroup performance (e.g. by site, sex, scanner) at a fixed threshold.

    Args:
        frame: one row per image with ``y_col`` (0/1), ``score_col`` (float) and ``patient_col``.
        by: subgroup columns; those missing from ``frame`` are skipped. Missing values form their own group.
        y_col, score_col, patient_col: column names.
        threshold: decision threshold for sensitivity / specificity / accuracy.
        n_boot: patient-bootstrap resamples for ``auc_ci``; 0 disables it.
        seed: bootstrap seed.

    Returns:
        One dict per (column, value): ``group, value, n_images, n_patients, n_positive, auc`` (nan for a
        single-class subgroup), ``auc_ci`` (``[lo, hi]``, or None when not bootstrapped, single-class or one patient),
        ``sensitivity, specificity, accuracy``.
    """
    rows = []
    for column in (c for c in by if c in frame.columns):
        for value, sub in frame.groupby(column, dropna=False, sort=True):
            y, s = _binary_inputs(sub[y_col].to_numpy(), sub[score_col].to_numpy())
            auc_ci = None
            # one patient cannot be resampled: an interval over patients does not exist there
            if n_boot > 0 and _has_both_classes(y) and sub[patient_col].nunique(dropna=False) >= 2:
                auc_ci = patient_bootstrap(y, s, sub[patient_col].to_numpy(), rank_auc, n_boot, seed)["ci"]
            op = operating_point(y, s, threshold)
            rows.append({
                "group": column,
                "value": _json_scalar(value),
                "n_images": len(sub),
                "n_patients": int(sub[patient_col].nunique(dropna=False)),
                "n_positive": int(y.sum()),
                "auc": _auc(y, s),
                "auc_ci": auc_ci,
                "sensitivity": op["sensitivity"],
                "specificity": op["specificity"],
                "accuracy": op["accuracy"],
            })
    return rows


def evaluate_split(
    y_true,
    score,
    patient,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
) -> dict:
    """Everything a report needs for one binary split, as one JSON-serialisable dict.

    Args:
        y_true: (n,) int 0/1 labels.
        score: (n,) float positive-class probability in [0, 1].
        patient: (n,) patient identifiers.
        threshold: fixed decision threshold (chosen on validation data, not on this split).
        n_boot, seed, alpha: patient-bootstrap settings shared by every interval.
        n_bins: calibration bins.

    Returns:
        :func:`operating_point` fields and ``auc, pr_auc, brier, ece`` at top level, plus
        ``auc_ci, pr_auc_ci, sensitivity_ci, specificity_ci`` (``[lo, hi]``), ``ci_level``, ``n_boot``,
        ``calibration_curve``, ``n_images, n_patients, n_positive``.
    """
    y, s = _binary_inputs(y_true, score)
    patient = np.asarray(patient)

    def ci(statistic: Statistic) -> list[float]:
        return patient_bootstrap(y, s, patient, statistic, n_boot, seed, alpha)["ci"]

    cal = calibration(y, s, n_bins)
    return {
        **operating_point(y, s, threshold),
        **_binary_discrimination(y, s),
        "auc_ci": ci(rank_auc),
        "pr_auc_ci": ci(_pr_auc),
        "sensitivity_ci": ci(_sensitivity_at(threshold)),
        "specificity_ci": ci(_specificity_at(threshold)),
        "ci_level": 1 - alpha,
        "n_boot": n_boot,
        "brier": cal["brier"],
        "ece": cal["ece"],
        "calibration_curve": cal["curve"],
        "n_images": len(y),
        "n_patients": int(pd.Series(patient).nunique(dropna=False)),
        "n_positive": int(y.sum()),
    }
