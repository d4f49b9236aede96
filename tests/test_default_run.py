"""The default config end to end (`dvc repro` through evaluate on the 100-patient synthetic cohort).

This is the README's main command in a scratch copy of the project: it proves the pipeline learns.
A broken link anywhere (labels detached from images, wrong windowing, a backbone left random, a
train/test leak hidden by a metric bug) cannot pass the floors below: a model that learned nothing
scores test AUC 0.5 ± 0.1 on these 38 images and cannot separate the held-out CT nodules.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from tests.test_dvc_pipeline import _dvc, scratch_project


@pytest.mark.slow
def test_default_config_learns_the_synthetic_task(tmp_path):
    scratch_project(tmp_path, shrink=False)

    done = _dvc(tmp_path, "repro")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "reports/metrics.json").read_text())
    test = result["test"]
    assert test["n_images"] >= 30 and test["n_patients"] >= 10
    assert test["auc"] >= 0.55, test
    card = json.loads((tmp_path / "models/model_card.json").read_text())
    assert card["validation"]["auc"] >= 0.65, card["validation"]
    # CT nodules are the strong signal of this cohort (radiograph nodules are faint, and 70 training
    # patients do not teach them): held-out CT images (validation + test, 28 with 9 lesions) must
    # be separated well (0.87 measured). A model that learned nothing reaches 0.8 with p < 1 % (~2.5 SD).
    predictions = pd.read_csv(tmp_path / "reports/predictions.csv", dtype={"image_id": str})
    index = pd.read_parquet(tmp_path / "data/processed/images/index.parquet")
    ct = predictions.merge(index[["image_id", "modality"]], on="image_id").query("modality == 'CT'")
    assert ct["y_true"].sum() >= 3 and roc_auc_score(ct["y_true"], ct["score"]) >= 0.8
    assert (tmp_path / "reports/report.html").stat().st_size > 10_000
