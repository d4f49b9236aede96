"""Tests for the evaluation metrics: agreement with scikit-learn, thresholds, calibration, patient bootstrap."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from pipeline import metrics
from pipeline.metrics import (
    MAX_CURVE_POINTS,
    calibration,
    choose_threshold,
    discrimination,
    evaluate_split,
    operating_point,
    paired_auc_difference,
    patient_bootstrap,
    pr_points,
    rank_auc,
    roc_points,
    subgroup_table,
)


def binormal(seed: int, n: int, d: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels ~ Bernoulli(0.4); scores N(0,1) for negatives, N(d,1) for positives, squashed into (0, 1)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return y, norm.cdf(rng.normal(d * y, 1.0))


def cohort(seed: int, n_patients: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary data with 1-5 images per patient and a per-patient label: (y, score, patient)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 6, n_patients)
    patient = np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient)
    y = np.repeat(rng.random(n_patients) < 0.4, per_patient).astype(int)
    # Round to 2 decimals so ties occur, as they do with real model outputs.
    return y, np.round(norm.cdf(rng.normal(y, 1.0)), 2), patient


# --- agreement with scikit-learn -----------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.71])
def test_operating_point_matches_sklearn(threshold):
    y, s, _ = cohort(1)
    pred = (s >= threshold).astype(int)
    op = operating_point(y, s, threshold)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert op["confusion_matrix"] == confusion_matrix(y, pred).tolist() == [[tn, fp], [fn, tp]]
    assert (op["tn"], op["fp"], op["fn"], op["tp"]) == (tn, fp, fn, tp)
    assert op["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert op["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert op["ppv"] == pytest.approx(precision_score(y, pred, pos_label=1))
    assert op["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert op["f1"] == pytest.approx(f1_score(y, pred))
    assert op["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert op["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert op["threshold"] == threshold
    json.dumps(op, allow_nan=False)
    assert all(type(v) in (int, float) for k, v in op.items() if k != "confusion_matrix")


def test_operating_point_undefined_ratios_are_nan():
    op = operating_point([0, 0, 0], [0.2, 0.4, 0.9], threshold=0.95)  # no positives, no positive calls
    assert math.isnan(op["sensitivity"]) and math.isnan(op["ppv"]) and math.isnan(op["f1"])
    assert math.isnan(op["balanced_accuracy"])
    assert op["specificity"] == op["npv"] == op["accuracy"] == 1.0
    assert op["confusion_matrix"] == [[3, 0], [0, 0]]
    json.dumps(op)


def test_binary_discrimination_matches_sklearn():
    y, s, _ = cohort(2)
    result = discrimination(y, s)
    assert result["auc"] == pytest.approx(roc_auc_score(y, s))
    assert result["pr_auc"] == pytest.approx(average_precision_score(y, s))
    assert set(result) == {"auc", "pr_auc"}


def test_binary_discrimination_single_class_is_nan():
    result = discrimination([1, 1, 1], [0.2, 0.5, 0.9])
    assert math.isnan(result["auc"]) and math.isnan(result["pr_auc"])


def test_multiclass_discrimination_matches_sklearn_ovr_macro():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = discrimination(y, proba)
    assert result["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    for c in range(3):
        assert result["per_class"][str(c)]["auc"] == pytest.approx(roc_auc_score(y == c, proba[:, c]))
        assert result["per_class"][str(c)]["pr_auc"] == pytest.approx(average_precision_score(y == c, proba[:, c]))
    assert result["pr_auc"] == pytest.approx(np.mean([average_precision_score(y == c, proba[:, c]) for c in range(3)]))


def test_multiclass_absent_class_is_nan_and_left_out_of_macro():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 100)  # class 2 never occurs
    proba = rng.dirichlet(np.ones(3), 100)
    result = discrimination(y, proba)
    assert math.isnan(result["per_class"]["2"]["auc"]) and math.isnan(result["per_class"]["2"]["pr_auc"])
    assert result["auc"] == pytest.approx(np.mean([roc_auc_score(y == c, proba[:, c]) for c in (0, 1)]))
    with pytest.raises(ValueError, match="class indices"):
        discrimination(np.full(100, 3), proba)


def test_calibration_matches_sklearn():
    y, s, _ = cohort(5)  # 2-decimal scores: many land exactly on bin edges
    result = calibration(y, s, n_bins=10)
    assert result["brier"] == pytest.approx(brier_score_loss(y, s))
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    curve = result["curve"]
    np.testing.assert_allclose([p["fraction_positive"] for p in curve], prob_true)
    np.testing.assert_allclose([p["mean_predicted"] for p in curve], prob_pred)
    assert sum(p["count"] for p in curve) == len(y)
    assert all(p["bin_lower"] <= p["mean_predicted"] <= p["bin_upper"] for p in curve)
    ece = sum(p["count"] * abs(p["mean_predicted"] - p["fraction_positive"]) for p in curve) / len(y)
    assert result["ece"] == pytest.approx(ece)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration(y, s + 1)


def test_ece_small_when_calibrated_and_large_when_not():
    rng = np.random.default_rng(6)
    p = rng.random(20_000)
    y = (rng.random(p.size) < p).astype(int)
    assert calibration(y, p)["ece"] < 0.03
    # Overconfident-to-underconfident squash towards 0.5: true ECE = 0.8 * E|p - 0.5| = 0.2.
    assert calibration(y, 0.5 + 0.2 * (p - 0.5))["ece"] > 0.15


# --- thresholds ----------------------------------------------------------------------------------


def test_youden_threshold_attains_max_tpr_minus_fpr():
    y, s, _ = cohort(7)
    fpr, tpr, _ = roc_curve(y, s)
    threshold = choose_threshold(y, s, "youden")
    op = operating_point(y, s, threshold)
    assert op["sensitivity"] + op["specificity"] - 1 == pytest.approx(np.max(tpr - fpr))


def test_youden_ties_go_to_highest_threshold():
    # J = 0.5 both at threshold 0.4 and at 0.2.
    assert choose_threshold([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.4


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 1.0])
def test_sensitivity_threshold_is_highest_reaching_target(target):
    y, s, _ = cohort(8)
    threshold = choose_threshold(y, s, "sensitivity", target_sensitivity=target)
    assert operating_point(y, s, threshold)["sensitivity"] >= target
    higher = s[s > threshold]
    if higher.size:  # the next score up as threshold misses the target
        assert operating_point(y, s, higher.min())["sensitivity"] < target


def test_choose_threshold_errors():
    y, s, _ = cohort(9)
    with pytest.raises(ValueError, match="youden.*sensitivity"):
        choose_threshold(y, s, "f1")
    with pytest.raises(ValueError, match="single class"):
        choose_threshold(np.ones_like(y), s)
    with pytest.raises(ValueError, match="0 and 1"):
        choose_threshold(y * 2, s)


# --- curves for plots ----------------------------------------------------------------------------


def test_curves_match_sklearn_when_small():
    y, s, _ = cohort(10)
    fpr, tpr, thresholds = roc_curve(y, s)
    points = roc_points(y, s)
    np.testing.assert_allclose([p["fpr"] for p in points], fpr)
    np.testing.assert_allclose([p["tpr"] for p in points], tpr)
    np.testing.assert_allclose([p["threshold"] for p in points], np.minimum(thresholds, 1.0))
    pr = pr_points(y, s)
    assert pr[0]["recall"] == 0 and pr[-1]["recall"] == 1
    assert [p["recall"] for p in pr] == sorted(p["recall"] for p in pr)
    json.dumps(points, allow_nan=False)
    json.dumps(pr, allow_nan=False)


def test_curves_are_thinned_keeping_ends():
    y, s = binormal(11, 5000)
    full_fpr = roc_curve(y, s)[0]
    points = roc_points(y, s)
    assert len(full_fpr) > MAX_CURVE_POINTS >= len(points)
    assert (points[0]["fpr"], points[0]["tpr"], points[0]["threshold"]) == (0.0, 0.0, 1.0)
    assert (points[-1]["fpr"], points[-1]["tpr"]) == (1.0, 1.0)
    pr = pr_points(y, s)
    assert len(pr) <= MAX_CURVE_POINTS
    assert (pr[0]["recall"], pr[0]["precision"]) == (0.0, 1.0) and pr[-1]["recall"] == 1.0


# --- patient bootstrap ---------------------------------------------------------------------------


def test_bootstrap_resamples_whole_patients():
    # Patient i has i + 1 images whose score is i, so each resample's composition is visible.
    sizes = np.arange(1, 9)
    score = np.repeat(np.arange(8), sizes).astype(float)
    y = np.zeros_like(score, dtype=int)
    patient = np.array([f"P{int(i)}" for i in score])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(score))  # patients' rows interleaved, not contiguous
    patients_drawn = []

    def record(y_b, s_b):
        draws = {p: n / sizes[p] for p, n in Counter(s_b.astype(int).tolist()).items()}
        assert all(d == int(d) for d in draws.values())  # only whole patients, each possibly repeated
        patients_drawn.append(sum(draws.values()))
        return 0.0

    result = patient_bootstrap(y[order], score[order], patient[order], record, n_boot=200, seed=1)
    assert patients_drawn == [8] * 201  # 200 resamples and the full-data estimate, 8 patients each
    assert result["n_boot"] == 200 and result["n_skipped"] == 0


def test_bootstrap_deterministic_per_seed():
    y, s, patient = cohort(12)
    result, again, other = (patient_bootstrap(y, s, patient, roc_auc_score, n_boot=50, seed=seed) for seed in (3, 3, 4))
    assert result == again
    assert result["ci"] != other["ci"]
    assert result["estimate"] == pytest.approx(roc_auc_score(y, s))
    assert result["ci"][0] <= result["estimate"] <= result["ci"][1]
    assert result["level"] == pytest.approx(0.95)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_skips_single_class_resamples():
    y = np.r_[1, np.zeros(9, dtype=int)]  # one positive patient among ten
    s = np.linspace(0, 1, 10)
    result = patient_bootstrap(y, s, np.arange(10), roc_auc_score, n_boot=200, seed=0)
    assert result["n_skipped"] > 0  # ~(0.9)^10 of resamples miss the positive patient
    assert result["n_boot"] + result["n_skipped"] == 200
    assert not any(math.isnan(v) for v in result["ci"])


def test_bootstrap_needs_two_patients():
    with pytest.raises(ValueError, match="at least 2 patients"):
        patient_bootstrap([0, 1, 1], [0.1, 0.8, 0.7], ["A", "A", "A"], roc_auc_score)


def auc_fast(y, s):
    """Mann-Whitney AUC without scikit-learn's per-call validation (12k calls in the coverage test)."""
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean(pos[:, None] > neg[None, :])) if pos.size and neg.size else math.nan


def test_bootstrap_ci_coverage_on_binormal():
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    covered = 0
    replicates = 60
    for r in range(replicates):
        y = np.r_[np.zeros(50, dtype=int), np.ones(50, dtype=int)]
        s = rng.normal(d * y, 1.0)
        ci = patient_bootstrap(y, s, np.arange(100), auc_fast, n_boot=200, seed=r)["ci"]
        covered += ci[0] <= true_auc <= ci[1]
    assert 0.8 <= covered / replicates <= 1.0


def test_rank_auc_equals_roc_auc_score_with_ties_and_is_nan_on_one_class():
    y, s, _ = cohort(21)  # rounded scores: ties
    assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert math.isnan(rank_auc(np.ones(5, dtype=int), np.linspace(0, 1, 5)))


# --- paired AUC difference -----------------------------------------------------------------------


def test_paired_auc_difference_estimate_is_the_difference_of_the_aucs_and_its_ci_contains_it():
    y, s, patient = cohort(22, n_patients=80)
    worse = np.clip(s + np.random.default_rng(0).normal(0, 0.3, len(s)), 0, 1)
    result = paired_auc_difference(y, s, worse, patient, n_boot=200, seed=1)
    assert result["estimate"] == rank_auc(y, s) - rank_auc(y, worse)
    lo, hi = result["ci"]
    assert lo < result["estimate"] < hi and 0 < result["estimate"]
    assert result["n_boot"] + result["n_skipped"] == 200 and result["level"] == pytest.approx(0.95)
    assert result == paired_auc_difference(y, s, worse, patient, n_boot=200, seed=1)
    assert result["ci"] != paired_auc_difference(y, s, worse, patient, n_boot=200, seed=2)["ci"]
    # a 1-D side is the same as one column
    assert result == paired_auc_difference(y, s[:, None], worse[:, None], patient, n_boot=200, seed=1)
    # swapping the sides negates everything: the same patients are drawn on every resample
    swapped = paired_auc_difference(y, worse, s, patient, n_boot=200, seed=1)
    assert swapped["estimate"] == -result["estimate"] and swapped["ci"] == pytest.approx([-hi, -lo])


def test_paired_auc_difference_of_a_model_with_itself_is_exactly_zero():
    y, s, patient = cohort(23)
    result = paired_auc_difference(y, s, s ** 2, patient, n_boot=100)  # a monotone transform: same ranks
    assert result["estimate"] == 0 and result["ci"] == [0.0, 0.0]


def test_paired_auc_difference_averages_the_columns_of_each_side():
    y, s, patient = cohort(24)
    rng = np.random.default_rng(5)
    a = np.column_stack([np.clip(s + rng.normal(0, 0.2, len(s)), 0, 1) for _ in range(3)])
    b = np.column_stack([rng.random(len(s)) for _ in range(2)])
    result = paired_auc_difference(y, a, b, patient, n_boot=50)
    expected = np.mean([rank_auc(y, a[:, i]) for i in range(3)]) - np.mean([rank_auc(y, b[:, i]) for i in range(2)])
    assert result["estimate"] == pytest.approx(expected, abs=1e-15)
    # each resample uses the same rows for every column: the bootstrap of the averaged statistic
    by_hand = patient_bootstrap(
        y, np.column_stack([a, b]), patient,
        lambda yb, sb: float(np.mean([rank_auc(yb, sb[:, i]) for i in range(3)])
                             - np.mean([rank_auc(yb, sb[:, i]) for i in range(3, 5)])), n_boot=50)
    assert result == by_hand


def test_paired_auc_difference_on_one_class_is_nan():
    result = paired_auc_difference(np.zeros(6, dtype=int), np.linspace(0, 1, 6), np.ones(6), np.arange(6), n_boot=20)
    assert math.isnan(result["estimate"]) and all(math.isnan(v) for v in result["ci"]) and result["n_skipped"] == 20


# --- subgroups and the per-split report -----------------------------------------------------------


def test_subgroup_table_counts_and_single_class_group():
    y, s, patient = cohort(13, n_patients=80)
    frame = pd.DataFrame({"y_true": y, "score": s, "patient": patient})
    number = frame.groupby("patient").ngroup()
    frame["site"] = np.where(number % 3 == 0, "A", "B")
    frame.loc[(frame["y_true"] == 0) & (number % 5 == 0), "site"] = "C"  # site C: negatives only
    frame["sex"] = np.where(number % 2 == 0, "F", "M")
    frame["scanner"] = np.where(number % 4 == 0, None, "X")  # a missing value forms its own group

    rows = subgroup_table(frame, ["site", "sex", "scanner", "not_a_column"], threshold=0.5, n_boot=50)
    assert {r["group"] for r in rows} == {"site", "sex", "scanner"}
    for column in ("site", "sex", "scanner"):
        group = [r for r in rows if r["group"] == column]
        assert sum(r["n_images"] for r in group) == len(frame)
        assert sum(r["n_positive"] for r in group) == int(y.sum())
        assert sum(r["n_patients"] for r in group) == frame["patient"].nunique()
    for r in rows:
        sub = frame[frame[r["group"]].isna() if r["value"] is None or r["value"] != r["value"]
                    else frame[r["group"]] == r["value"]]
        assert r["n_images"] == len(sub)
        if sub["y_true"].nunique() == 2:
            assert r["auc"] == pytest.approx(roc_auc_score(sub["y_true"], sub["score"]))
            assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
            op = operating_point(sub["y_true"], sub["score"], 0.5)
            assert (r["sensitivity"], r["specificity"], r["accuracy"]) == (
                op["sensitivity"], op["specificity"], op["accuracy"])
        else:
            assert math.isnan(r["auc"]) and r["auc_ci"] is None
    site_c = next(r for r in rows if r["group"] == "site" and r["value"] == "C")
    assert site_c["n_positive"] == 0 and math.isnan(site_c["auc"])
    json.dumps(rows)
    assert all(r["auc_ci"] is None for r in subgroup_table(frame, ["site"], threshold=0.5))


def test_evaluate_split_report():
    y, s, patient = cohort(14, n_patients=120)
    report = evaluate_split(y, s, patient, threshold=0.5, n_boot=100, seed=0)
    json.loads(json.dumps(report))
    required = {"auc", "auc_ci", "pr_auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy",
                "balanced_accuracy", "confusion_matrix", "brier", "ece", "n_images", "n_patients", "threshold"}
    assert required <= set(report)
    assert report["auc"] == pytest.approx(roc_auc_score(y, s))
    assert report["pr_auc"] == pytest.approx(average_precision_score(y, s))
    assert report["brier"] == pytest.approx(brier_score_loss(y, s))
    for key in ("auc", "pr_auc", "sensitivity", "specificity"):
        lo, hi = report[f"{key}_ci"]
        assert isinstance(lo, float) and isinstance(hi, float)
        assert lo <= report[key] <= hi
    assert report["n_images"] == len(y) and report["n_patients"] == 120 and report["n_positive"] == y.sum()
    assert {k: report[k] for k in operating_point(y, s, 0.5)} == operating_point(y, s, 0.5)


def test_a_one_patient_subgroup_has_an_auc_but_no_patient_interval():
    frame = pd.DataFrame({"y_true": [0, 1, 0, 1, 1, 0], "score": [0.1, 0.9, 0.3, 0.7, 0.6, 0.2],
                          "patient": ["P1", "P1", "P2", "P2", "P3", "P3"], "site": ["A", "A", "B", "B", "B", "B"]})
    rows = {r["value"]: r for r in subgroup_table(frame, ["site"], threshold=0.5, n_boot=50)}
    assert rows["A"]["n_patients"] == 1 and rows["A"]["auc"] == 1.0 and rows["A"]["auc_ci"] is None
    assert rows["B"]["auc_ci"] is not None


def test_class_auc_is_the_positive_class_auc_for_two_classes_and_the_reported_macro_auc_beyond():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    probs = rng.dirichlet([1, 1], 60)
    assert metrics.class_auc(y, probs) == roc_auc_score(y, probs[:, 1])
    y3 = rng.integers(0, 3, 90)
    probs3 = rng.dirichlet([1, 1, 1], 90)
    assert metrics.class_auc(y3, probs3) == metrics.discrimination(y3, probs3)["auc"]
    assert np.isnan(metrics.class_auc(np.zeros(5, int), rng.dirichlet([1, 1], 5)))
