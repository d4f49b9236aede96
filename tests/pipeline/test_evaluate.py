"""The evaluate stage on a tiny trained model: metrics a user can recompute, DVC plot files, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import evaluate, metrics, models, train

TINY_TRAIN = train.TrainParams(epochs=2, batch_size=8, patience=0, workers=0, device="cpu", channels_last=False)
PARAMS = evaluate.EvaluateParams(n_boot=100, device="cpu")


@pytest.fixture(scope="module")
def trained(tiny_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    train.run(TINY_TRAIN, models.ModelParams(), *tiny_images, out, progress=False)
    return out / "model.pt"


@pytest.fixture(scope="module")
def evaluated(trained, tiny_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    summary = evaluate.run(PARAMS, trained, *tiny_images, out, report=False)
    return out, summary


def test_metrics_json_has_what_a_promotion_needs_and_matches_sklearn(evaluated):
    out, summary = evaluated
    result = json.loads((out / "metrics.json").read_text())
    test = result["test"]
    for key in ("auc", "sensitivity", "specificity", "accuracy", "n_images", "n_patients", "ppv", "npv", "f1",
                "balanced_accuracy", "brier", "ece", "pr_auc", "confusion_matrix"):
        assert key in test, key
    assert len(test["auc_ci"]) == 2 and test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]
    assert [test["auc_ci_lo"], test["auc_ci_hi"]] == test["auc_ci"], "scalars for dvc metrics show"
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    rows = predictions[predictions["split"] == "test"]
    assert test["n_images"] == len(rows) == 12 and test["n_patients"] == rows["patient_key"].nunique() == 6
    assert test["auc"] == pytest.approx(roc_auc_score(rows["label"] == "lesion", rows["score"]))
    val = predictions[predictions["split"] == "val"]
    assert result["threshold"]["chosen_on"] == "val"
    assert result["threshold"]["value"] == pytest.approx(metrics.choose_threshold(val["y_true"], val["score"]))
    positives = rows["y_true"] == 1
    called = rows["score"] >= result["threshold"]["value"]
    assert test["sensitivity"] == pytest.approx((called & positives).sum() / positives.sum())
    assert summary.test_auc == test["auc"]
    assert set(predictions.columns) == {"image_id", "patient_key", "split", "label", "y_true", "score", "predicted"}


def test_dvc_plot_files_and_subgroups(evaluated):
    out, _ = evaluated
    roc = pd.read_csv(out / "plots/roc.csv")
    assert roc["fpr"].iloc[0] == 0 and roc["tpr"].iloc[-1] == 1 and roc["fpr"].is_monotonic_increasing
    confusion = pd.read_csv(out / "plots/confusion.csv")
    assert len(confusion) == 12 and set(confusion["actual"]) <= {"normal", "lesion"}
    test = json.loads((out / "metrics.json").read_text())["test"]
    (tn, fp), (fn, tp) = test["confusion_matrix"]
    assert ((confusion["actual"] == "lesion") & (confusion["predicted"] == "lesion")).sum() == tp
    assert (out / "plots/calibration.csv").exists() and (out / "plots/pr.csv").exists()
    rows = json.loads((out / "subgroups.json").read_text())["test"]
    sites = [r for r in rows if r["group"] == "site"]
    assert sum(r["n_images"] for r in sites) == 12 and {r["value"] for r in sites} == {"site-a", "site-b"}
    assert not [r for r in rows if r["group"] == "manufacturer"], "a column the index lacks is skipped"


def test_images_that_do_not_match_the_model_are_an_error(trained, tiny_images, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_images[0], images)
    tensors = np.load(images / "tensors.npy")
    np.save(images / "tensors.npy", np.repeat(np.repeat(tensors, 2, axis=2), 2, axis=3))
    with pytest.raises(ValueError, match=r"images are \[3, 64, 64\] but .*model.pt expects \[3, 32, 32\]"):
        evaluate.run(PARAMS, trained, images, tiny_images[1], tmp_path / "out", report=False)


def test_more_than_two_classes_get_macro_one_vs_rest(tiny_images, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_images[0], images)
    index = pd.read_parquet(images / "index.parquet")
    index["label"] = np.array(["normal", "lesion", "other"])[index["row"] // 2 % 3]
    index.to_parquet(images / "index.parquet")
    params = replace(TINY_TRAIN, classes=("normal", "lesion", "other"), epochs=1)
    train.run(params, models.ModelParams(), images, tiny_images[1], tmp_path / "model", progress=False)
    evaluate.run(PARAMS, tmp_path / "model/model.pt", images, tiny_images[1], tmp_path / "out", report=False)
    test = json.loads((tmp_path / "out/metrics.json").read_text())["test"]
    rows = pd.read_csv(tmp_path / "out/predictions.csv").query("split == 'test'")
    probs = rows[["prob_normal", "prob_lesion", "prob_other"]].to_numpy()
    expected = roc_auc_score(rows["y_true"], probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro")
    assert test["auc"] == pytest.approx(expected, abs=1e-6)
    assert set(test["per_class"]) == {"0", "1", "2"} and len(test["auc_ci"]) == 2
    assert np.array(test["confusion_matrix"]).sum() == test["n_images"] == len(rows)


def test_the_summary_table_shows_each_metric_with_its_ci(evaluated):
    out, _ = evaluated
    result = json.loads((out / "metrics.json").read_text())
    table = evaluate.metrics_table(result)
    lo, hi = result["test"]["auc_ci"]
    assert f"| AUC | {result['test']['auc']:.3f} | [{lo:.3f}, {hi:.3f}] |" in table
    assert f"| {result['test']['n_images']} / {result['test']['n_patients']} |" in table
