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

from pipeline import evaluate, lesions, metrics, models, train

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


# --------------------------------------------------------------------------------------------------
# lesion ground truth: Grad-CAM localisation


def test_hits_and_hit_rate_on_known_maps():
    maps = np.zeros((3, 16, 16), np.float32)
    maps[0, 4, 5] = maps[1, 12, 12] = 1.0  # image 2: flat, peaks at (0, 0)
    table = pd.DataFrame({"row": [7, 8, 8, 9], "image_id": ["a", "b", "b", "c"], "centre_row": [4.0, 2.0, 10.0, 8.0],
                          "centre_col": [7.0, 2.0, 10.0, 8.0], "radius_px": [2.0, 1.0, 2.9, 3.0]})
    hit = lesions.hits(maps, np.array([7, 8, 9]), table)
    assert hit.tolist() == [True, True, False]  # on the rim; inside the second of two lesions; flat map misses
    assert lesions.hits(maps, np.array([7, 8, 9]), table.assign(radius_px=[1.0, 1.0, 2.9, 3.0])).tolist() == \
        [False, True, False]
    assert lesions.hits(maps, np.array([7, 8, 9]), table.assign(radius_px=[1.0, 1.0, 2.9, 3.0]),
                        tolerance_px=1.0).tolist() == [True, True, False]
    found = lesions.hit_rate(hit, np.array(["p1", "p2", "p3"]), n_boot=200, seed=0, alpha=0.05)
    assert found["hit_rate"] == pytest.approx(2 / 3) and found["n_images"] == 3 and found["n_hits"] == 2
    assert 0 <= found["ci_low"] <= found["hit_rate"] <= found["ci_high"] <= 1
    assert lesions.hit_rate(hit[:1], np.array(["p1"]), n_boot=10, seed=0, alpha=0.05)["ci_low"] is None
    none = lesions.hit_rate(lesions.hits(maps[:0], np.array([], int), table), np.array([]), n_boot=10, seed=0,
                            alpha=0.05)
    assert none["hit_rate"] is None and none["n_images"] == 0  # no true positive with ground truth


def test_localisation_counts_every_true_positive_and_changes_no_other_metric(evaluated, trained, tiny_images,
                                                                             tmp_path, monkeypatch):
    from pipeline import report

    images = tmp_path / "images"
    shutil.copytree(tiny_images[0], images)
    index = pd.read_parquet(images / "index.parquet")
    positives = index[index["label"] == "lesion"]
    # ground truth on every positive image: a lesion of radius 3 at (6, 6); the negatives carry one too,
    # which must change nothing (ground truth is never a label)
    table = pd.DataFrame({"row": index["row"], "image_id": index["image_id"], "centre_row": 6.0, "centre_col": 6.0,
                          "radius_px": 3.0})
    table.to_parquet(images / "lesions.parquet")

    tensors = np.load(images / "tensors.npy").astype(np.float32)
    seen: list[int] = []

    def fake_gradcam(model, backbone, batch, class_index):  # even rows peak on the lesion, odd rows far from it
        maps = np.zeros((len(batch), *batch.shape[2:]), np.float32)
        for k, image in enumerate(batch.numpy()):
            row = int(np.flatnonzero((tensors == image).all(axis=(1, 2, 3)))[0])
            at = 6 if row % 2 == 0 else 26
            maps[k, at, at] = 1.0
            seen.append(row)
        return maps

    monkeypatch.setattr(report, "gradcam", fake_gradcam)
    out = tmp_path / "out"
    evaluate.run(PARAMS, trained, images, tiny_images[1], out, report=False)

    with_truth = json.loads((out / "metrics.json").read_text())
    without = json.loads((evaluated[0] / "metrics.json").read_text())
    found = with_truth["test"].pop("localisation")
    for key in ("localisation_hit_rate", "localisation_hit_rate_ci", "localisation_hit_rate_ci_lo",
                "localisation_hit_rate_ci_hi", "localisation_pointing_game"):
        with_truth["test"].pop(key)
    assert with_truth == without, "ground truth changed a metric other than localisation"
    assert (out / "predictions.csv").read_text() == (evaluated[0] / "predictions.csv").read_text()

    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str})
    test = predictions[predictions["split"] == "test"].merge(index[["image_id", "row"]], on="image_id")
    true_positive = test[(test["y_true"] == 1) & (test["predicted"] == 1)]
    assert len(true_positive) >= 1, "the tiny model should find a lesion"
    assert found["n_images"] == found["n_true_positives"] == len(true_positive)
    assert sorted(seen) == sorted(true_positive["row"]), "Grad-CAM on exactly the true positives"
    assert set(true_positive["image_id"]) <= set(positives["image_id"])
    assert found["n_hits"] == int((true_positive["row"] % 2 == 0).sum())
    assert found["hit_rate"] == pytest.approx((true_positive["row"] % 2 == 0).mean())
    assert found["layer"] == models.backbone("efficientnet-lite0").gradcam_layer


def test_localisation_on_a_constructed_test_split(monkeypatch):
    """Only true positives with ground truth count; each is a hit when its map peaks inside its lesion."""
    from pipeline import report

    # rows 0-5 true positives (row 5 without ground truth), 6 a false negative, 7 a false positive
    test = pd.DataFrame({"row": range(8), "patient_key": ["A", "A", "B", "C", "D", "E", "F", "G"],
                         "y_true": [1, 1, 1, 1, 1, 1, 1, 0], "predicted": [1, 1, 1, 1, 1, 1, 0, 1]})
    truth = pd.DataFrame({"row": [0, 1, 2, 3, 4, 6, 7], "image_id": list("abcdefg"), "centre_row": 10.0,
                          "centre_col": 12.0, "radius_px": 4.0})
    peaks = {0: (10, 12), 1: (13, 12), 2: (10, 16), 3: (10, 17), 4: (30, 30), 6: (10, 12), 7: (10, 12)}
    scored: list[int] = []

    def fake_gradcam(model, backbone, batch, class_index):
        rows = [int(v) for v in batch[:, 0, 0, 0]]  # the test tensors carry their row in pixel (0, 0)
        scored.extend(rows)
        maps = np.zeros((len(batch), 32, 32), np.float32)
        for k, row in enumerate(rows):
            maps[k][peaks[row]] = 1.0
        return maps

    monkeypatch.setattr(report, "gradcam", fake_gradcam)
    monkeypatch.setattr(report, "gradcam_stride", lambda model, backbone, shape: 4.0)
    tensors = np.zeros((8, 3, 32, 32), np.float32)
    tensors[:, 0, 0, 0] = np.arange(8)
    found = evaluate._localisation(None, "efficientnet-lite0", test, truth, tensors, PARAMS, 0.05)
    assert sorted(scored) == [0, 1, 2, 3, 4]
    assert (found["n_images"], found["n_hits"], found["n_true_positives"], found["n_patients"]) == (5, 3, 6, 4)
    assert found["hit_rate"] == pytest.approx(0.6)  # hits: on the centre, 3 px and 4 px (the rim) away
    game = found["pointing_game"]  # half a 4-px cell of tolerance: 5 px away is near enough, 28 px is not
    assert game["tolerance_px"] == 2.0 and game["n_hits"] == 4 and game["hit_rate"] == pytest.approx(0.8)
    assert 0 <= found["ci_low"] <= 0.6 <= found["ci_high"] <= 1
