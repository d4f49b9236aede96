"""The transfer_study flow orchestrates pipeline.study's steps as tasks and publishes the study table.

The DVC steps (prepare, queue, run, collect) are replaced by recorders here: they run for real in
tests/pipeline/test_study.py's tiny grid. Compare, findings and report run for real.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect")]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _fake_collect(repo, runs, base, target_val_auc):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 15)
    rows, curves, predictions = [], [], {}
    for run in runs:
        signal = {"scratch": 0.2, "finetune": 0.9}[run.strategy] * run.fraction
        predictions[run.name] = pd.DataFrame({
            "image_id": [f"img{i:02d}" for i in range(30)], "patient_key": [f"P{i // 2:02d}" for i in range(30)],
            "split": "test", "y_true": y, "score": y * signal + rng.uniform(0, 1, 30)})
        rows.append({"experiment": run.name, "strategy": run.strategy, "fraction": run.fraction, "seed": run.seed,
                     "train_patients": int(20 * run.fraction), "train_images": int(60 * run.fraction),
                     "val_images": 30, "test_images": 30, "epochs_run": 2, "best_epoch": 2, "best_val_auc": 0.7,
                     "test_auc": 0.5 + signal / 2, "test_auc_lo": 0.4, "test_auc_hi": 0.9,
                     "epochs_to_target": 1.0, "time_to_target_s": 5.0, "train_time_s": 12.0})
        curves.append(pd.DataFrame({"experiment": run.name, "strategy": run.strategy, "fraction": run.fraction,
                                    "seed": run.seed, "epoch": [1, 2], "val_auc": [0.6, 0.7], "elapsed_s": [5.0, 10.0]}))
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True), predictions


def test_flow_runs_each_step_as_a_task_and_publishes_the_study_table(harness, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.study import transfer_study

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "imagenet"}, "study": {
        "grid": "tiny", "name": "st", "grids": {"tiny": {"strategies": ["scratch", "finetune"], "fractions": [0.5, 1.0],
                                                         "epochs": 2, "target_val_auc": 0.6, "n_boot": 50}}}}))
    calls: list = []
    monkeypatch.setattr(study, "preflight", lambda repo: calls.append("preflight") or "c0ffee")
    monkeypatch.setattr(study, "prepare", lambda repo, echo=None: calls.append("prepare"))
    monkeypatch.setattr(study, "queue", lambda repo, runs, base, resume=False: calls.append(
        ("queue", [r.name for r in runs], base, resume)) or list(runs))
    monkeypatch.setattr(study, "run_queue", lambda repo, runs, jobs=1, echo=None: calls.append(("run", len(runs), jobs)))
    monkeypatch.setattr(study, "collect", _fake_collect)

    result = transfer_study(repo=str(tmp_path), jobs=2)

    names = ["st-scratch-50pct-s0", "st-finetune-50pct-s0", "st-scratch-100pct-s0", "st-finetune-100pct-s0"]
    assert calls == ["preflight", "prepare", ("queue", names, "c0ffee", False), ("run", 4, 2)]
    assert result["runs"] == result["ran"] == 4 and result["report"] == str(tmp_path / "reports/study.md")
    assert any(s.startswith("At 100% of the training data (20 patients): fine-tuning") for s in result["findings"])
    assert len(pd.read_csv(tmp_path / "reports/study.csv")) == 4
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.key == "study-table"]
    assert artifacts, "artifact study-table missing"
    markdown = artifacts[-1].data
    assert "| fine-tuning | 100% | 20 |" in markdown and result["findings"][0] in markdown
