"""The transfer-learning study: nested training subsets, the plan, paired comparisons, findings from a
fixed table, the report, and a tiny grid end to end through `medtl study` in a scratch DVC project."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import metrics, strategies, study
from pipeline.data import SplitData, load_splits, train_subset
from tests.test_dvc_pipeline import _dvc, scratch_project

CLASSES = ("normal", "lesion")


# ------------------------------------------------------------------------------- nested subsets


def _train_patients(data: SplitData, index: pd.DataFrame) -> set[str]:
    return set(index.set_index("row").loc[data.rows["train"], "patient_key"])


def test_training_subsets_are_nested_stratified_and_leave_val_and_test_alone(tiny_images):
    images, splits = tiny_images
    index = pd.read_parquet(images / "index.parquet")
    full = load_splits(images, splits, CLASSES)
    subsets = {f: load_splits(images, splits, CLASSES, fraction=f) for f in (0.1, 0.25, 0.5, 1.0)}
    patients = {f: _train_patients(d, index) for f, d in subsets.items()}
    assert patients[0.1] <= patients[0.25] <= patients[0.5] <= patients[1.0] == _train_patients(full, index)
    assert patients[0.1] < patients[0.5] < patients[1.0], "smaller fractions keep fewer patients"
    # 12 training patients: 4 with lesions, 8 normal -> ceil(f * n) per class, at least one each
    lesion = set(index.loc[index["label"] == "lesion", "patient_key"])
    counts = {f: (len(p & lesion), len(p - lesion)) for f, p in patients.items()}
    assert counts == {0.1: (1, 1), 0.25: (1, 2), 0.5: (2, 4), 1.0: (4, 8)}
    for f, data in subsets.items():
        assert data.patients["train"] == len(patients[f]) and data.train_pool_patients == 12
        for split in ("val", "test"):
            np.testing.assert_array_equal(data.rows[split], full.rows[split])
            np.testing.assert_array_equal(data.labels[split], full.labels[split])


def test_another_fraction_seed_draws_other_nested_subsets():
    labels = pd.Series([1] * 30 + [0] * 70, index=[f"P-{i:03d}" for i in range(100)])
    for seed in (0, 1):
        picked = [train_subset(labels, f, seed) for f in (0.05, 0.1, 0.25, 0.5, 0.9, 1.0)]
        assert all(a <= b for a, b in pairwise(picked))
        assert [len(p) for p in picked] == [2 + 4, 3 + 7, 8 + 18, 15 + 35, 27 + 63, 100]
    assert train_subset(labels, 0.25, 0) != train_subset(labels, 0.25, 1)
    with pytest.raises(ValueError, match="train.fraction"):
        train_subset(labels, 0.0)


# ---------------------------------------------------------------------------------------- plan


def test_plan_maps_strategies_onto_params_and_names_each_run():
    grid = study.StudyGrid(strategies=["scratch", "feature_extraction"], fractions=[1.0, 0.25], seeds=[3], epochs=2,
                           overrides={"preprocess.size": 112, "evaluate.subgroups": []})
    runs = study.plan(grid, "st", pretrained="/models/site weights.pth")
    assert [r.name for r in runs] == ["st-scratch-25pct-s3", "st-feature-extraction-25pct-s3",
                                      "st-scratch-100pct-s3", "st-feature-extraction-100pct-s3"]
    scratch, feature = runs[0], runs[1]
    assert scratch.overrides["model.pretrained"] == "none" and scratch.overrides["train.strategy"] == "finetune"
    assert feature.overrides["model.pretrained"] == "/models/site weights.pth"
    assert feature.set_params() == [
        "preprocess.size=112", "evaluate.subgroups=[]", "model.pretrained='/models/site weights.pth'",
        "train.strategy=feature_extraction", "train.fraction=0.25", "train.fraction_seed=3", "train.seed=3",
        "train.epochs=2", "train.patience=0", "train.min_steps=0"]
    assert study.plan(grid, pretrained="none")[1].overrides["model.pretrained"] == "imagenet"
    # DVC's run cache cannot see params named `size`: such runs must not be restored from it
    assert scratch.needs_no_run_cache
    assert not any(r.needs_no_run_cache for r in study.plan(study.StudyGrid(overrides={"evaluate.n_boot": 50})))


@pytest.mark.parametrize("values, message", [
    ({"strategies": ["scratch", "lora"]}, "strategies"),
    ({"fractions": [0.5, 1.5]}, "fractions"),
    ({"overrides": {"train.epochs": 3}}, "may not be one the study sets"),
])
def test_bad_grids_are_errors_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        study.StudyGrid(**values)


def test_the_params_file_grids_are_valid():
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())["study"]
    selected = study.StudyParams(**params)
    cpu, gpu = selected.select("cpu"), selected.select("gpu")
    assert set(gpu.strategies) == set(strategies.STUDY_STRATEGIES)  # the real study compares every strategy
    assert {"scratch", "feature_extraction", "finetune"} <= set(cpu.strategies)  # pretraining vs none, both ways
    assert len(gpu.seeds) > 1 and gpu.epochs > cpu.epochs and 1.0 in cpu.fractions
    with pytest.raises(ValueError, match="no grid 'tpu'"):
        selected.select("tpu")


# ---------------------------------------------------------------------------- paired comparison


def _predictions(scores: np.ndarray, y: np.ndarray, test_ids: list[str] | None = None) -> pd.DataFrame:
    ids = test_ids or [f"img{i:03d}" for i in range(len(y))]
    return pd.DataFrame({"image_id": ids, "patient_key": [f"P{i // 2:03d}" for i in range(len(y))], "split": "test",
                         "y_true": y, "score": scores})


def test_paired_difference_and_the_evaluation_set_check():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    good = _predictions(y * 0.6 + rng.uniform(0, 0.5, 60), y)
    noise = _predictions(rng.uniform(0, 1, 60), y)
    d, lo, hi = study.paired_difference([good], [noise], n_boot=300)
    assert 0 < lo < d < hi and d > 0.3
    d_same, lo_same, hi_same = study.paired_difference([good], [good], n_boot=50)
    assert d_same == lo_same == hi_same == 0
    moved = _predictions(noise["score"].to_numpy(), y, [f"other{i}" for i in range(60)])
    with pytest.raises(study.StudyError, match="test images of b differ from those of a"):
        study.check_same_evaluation_sets({"a": good, "b": moved})


def test_paired_difference_is_the_metrics_paired_auc_difference_of_the_seeds_on_rows_in_image_order():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 25)
    a = [_predictions(y * 0.5 + rng.uniform(0, 1, 50), y) for _ in range(2)]
    b = [_predictions(rng.uniform(0, 1, 50), y) for _ in range(3)]
    shuffled = [f.sample(frac=1, random_state=i) for i, f in enumerate(a)]  # the order rows come in is irrelevant
    d, lo, hi = study.paired_difference(shuffled, b, n_boot=100, seed=4, ci_level=0.9)
    expected = metrics.paired_auc_difference(y, np.column_stack([f["score"] for f in a]),
                                             np.column_stack([f["score"] for f in b]), a[0]["patient_key"],
                                             n_boot=100, seed=4, alpha=0.1)
    assert (d, lo, hi) == (expected["estimate"], *expected["ci"])
    assert d == pytest.approx(np.mean([metrics.rank_auc(y, f["score"].to_numpy()) for f in a])
                              - np.mean([metrics.rank_auc(y, f["score"].to_numpy()) for f in b]))


def test_the_default_grid_runs_every_study_strategy_and_each_has_a_label_and_a_colour():
    assert study.StudyGrid().strategies == strategies.STUDY_STRATEGIES
    assert set(strategies.LABELS) == set(study.COLOURS) == set(strategies.STUDY_STRATEGIES)


def test_compare_averages_seeds_and_pairs_strategies_on_the_same_images():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    rows, predictions = [], {}
    for strategy, signal in (("scratch", 0.1), ("finetune", 0.8)):
        for seed in (0, 1):
            name = f"{strategy}-{seed}"
            predictions[name] = _predictions(y * signal + rng.uniform(0, 1, 40), y)
            rows.append({"experiment": name, "strategy": strategy, "fraction": 0.5, "seed": seed, "train_patients": 9,
                         "epochs_run": 3, "best_epoch": 2 + seed, "test_auc": 0.6 + seed / 10, "test_auc_lo": 0.5,
                         "test_auc_hi": 0.7, "epochs_to_target": [2.0, math.nan][seed] if strategy == "scratch" else 1.0,
                         "time_to_target_s": [20.0, math.nan][seed] if strategy == "scratch" else 9.0,
                         "train_time_s": 30.0})
    summary = study.compare(pd.DataFrame(rows), predictions, n_boot=200)
    assert list(summary["strategy"]) == ["scratch", "finetune"]
    finetune, scratch = summary.iloc[1], summary.iloc[0]
    assert finetune["seeds"] == 2 and finetune["test_auc"] == pytest.approx(0.65)
    assert finetune["vs_scratch_lo"] > 0 and math.isnan(finetune["vs_finetune"])
    assert scratch["vs_finetune"] == pytest.approx(-finetune["vs_scratch"])
    # one of two seeds missed the target: the median over seeds says "not reached"
    assert math.isnan(scratch["epochs_to_target"]) and finetune["epochs_to_target"] == 1.0


# ------------------------------------------------------------------------------------- findings

# A hand-made summary with planted effects (fractions 10/25/100 %, every strategy).
PLANTED = [
    # strategy, fraction, patients, auc, lo, hi, vs_scratch (d, lo, hi), vs_finetune (d, lo, hi), epochs to 0.7, s
    ("scratch", 0.1, 8, 0.60, 0.45, 0.75, None, (-0.12, -0.21, -0.03), None, None),
    ("feature_extraction", 0.1, 8, 0.70, 0.57, 0.82, (0.10, 0.02, 0.18), (-0.02, -0.09, 0.05), 2, 12),
    ("finetune", 0.1, 8, 0.72, 0.60, 0.84, (0.12, 0.03, 0.21), None, 3, 30),
    ("gradual", 0.1, 8, 0.65, 0.51, 0.78, (0.05, -0.03, 0.13), (-0.07, -0.15, 0.01), None, None),
    ("scratch", 0.25, 18, 0.70, 0.58, 0.81, None, (-0.08, -0.15, -0.01), 4, 80),
    ("feature_extraction", 0.25, 18, 0.76, 0.64, 0.86, (0.06, -0.02, 0.14), (-0.02, -0.08, 0.04), 2, 20),
    ("finetune", 0.25, 18, 0.78, 0.67, 0.88, (0.08, 0.01, 0.15), None, 2, 25),
    ("gradual", 0.25, 18, 0.77, 0.66, 0.87, (0.07, -0.01, 0.15), (-0.01, -0.06, 0.04), 3, 33),
    ("scratch", 1.0, 70, 0.85, 0.75, 0.93, None, (-0.02, -0.08, 0.04), 4, 200),
    ("feature_extraction", 1.0, 70, 0.76, 0.64, 0.86, (-0.09, -0.16, -0.02), (-0.11, -0.18, -0.04), None, None),
    ("finetune", 1.0, 70, 0.87, 0.78, 0.94, (0.02, -0.04, 0.08), None, 2, 110),
    ("gradual", 1.0, 70, 0.86, 0.76, 0.93, (0.01, -0.05, 0.07), (-0.01, -0.04, 0.02), 2, 120),
]


def _summary(rows) -> pd.DataFrame:
    nan3 = (math.nan,) * 3
    records = []
    for strategy, fraction, patients, auc, lo, hi, vs_scratch, vs_finetune, epochs, seconds in rows:
        records.append({
            "strategy": strategy, "fraction": fraction, "seeds": 1, "train_patients": patients, "epochs": 5,
            "test_auc": auc, "test_auc_lo": lo, "test_auc_hi": hi,
            **dict(zip(("vs_scratch", "vs_scratch_lo", "vs_scratch_hi"), vs_scratch or nan3)),
            **dict(zip(("vs_finetune", "vs_finetune_lo", "vs_finetune_hi"), vs_finetune or nan3)),
            "best_epoch": 3.0, "epochs_to_target": math.nan if epochs is None else float(epochs),
            "time_to_target_s": math.nan if seconds is None else float(seconds), "train_time_s": 100.0,
            "test_patients": 15})
    return pd.DataFrame(records)


def test_findings_are_computed_from_the_table():
    assert study.findings(_summary(PLANTED), target_val_auc=0.7) == [
        ("At 10% of the training data (8 patients): feature extraction beats scratch by +0.10 AUC "
         "(95% CI +0.02 to +0.18); fine-tuning beats scratch by +0.12 AUC (95% CI +0.03 to +0.21); "
         "gradual unfreezing is within CI of scratch (+0.05 AUC, 95% CI -0.03 to +0.13)."),
        ("At 25% of the training data (18 patients): feature extraction is within CI of scratch (+0.06 AUC, 95% CI "
         "-0.02 to +0.14); fine-tuning beats scratch by +0.08 AUC (95% CI +0.01 to +0.15); gradual unfreezing is "
         "within CI of scratch (+0.07 AUC, 95% CI -0.01 to +0.15)."),
        ("At 100% of the training data (70 patients): feature extraction is below scratch by -0.09 AUC (95% CI -0.16 "
         "to -0.02); fine-tuning is within CI of scratch (+0.02 AUC, 95% CI -0.04 to +0.08); "
         "gradual unfreezing is within CI of scratch (+0.01 AUC, 95% CI -0.05 to +0.07)."),
        ("Feature extraction is within CI of fine-tuning at ≤ 25% of the training data; fine-tuning is better at "
         "100% (+0.11 AUC, 95% CI +0.04 to +0.18)."),
        "Gradual unfreezing is within CI of fine-tuning at every fraction.",
        ("Pretrained below scratch: feature extraction at 100% (-0.09 AUC vs scratch, 95% CI -0.16 to -0.02). "
         "Before reading this as negative transfer, rule out an artefact: " + study.RECIPE_CHECKS),
        ("Highest test AUC per fraction: 10%: fine-tuning 0.72 (95% CI 0.60 to 0.84); 25%: fine-tuning 0.78 "
         "(95% CI 0.67 to 0.88); 100%: fine-tuning 0.87 (95% CI 0.78 to 0.94)."),
        ("Test AUC is above chance (its 95% CI excludes 0.5) in 11 of 12 strategy × fraction cells, all but scratch "
         "at 10%."),
        ("Resolution: the paired 95% CIs of the differences are ±0.07 AUC wide (median half-width) on 15 test "
         "patients: smaller differences cannot be told from noise here (more test patients or seeds narrow them)."),
        ("Validation AUC 0.7 reached with 10% of the training data: feature extraction after 2 epochs (12 s); "
         "fine-tuning after 3 epochs (30 s); scratch and gradual unfreezing not within 5 epochs."),
        ("Validation AUC 0.7 reached with 100% of the training data: fine-tuning after 2 epochs (110 s); gradual "
         "unfreezing after 2 epochs (120 s); scratch after 4 epochs (200 s); feature extraction not within 5 epochs."),
    ]


def test_fine_tuning_losing_to_feature_extraction_is_reported_with_what_to_check():
    # the issue-13 pattern: fine-tuning far below feature extraction at a small fraction
    rows = [("feature_extraction", 0.1, 8, 0.83, 0.74, 0.90, None, (0.36, 0.22, 0.49), None, None),
            ("finetune", 0.1, 8, 0.47, 0.36, 0.58, None, None, None, None),
            ("feature_extraction", 1.0, 70, 0.89, 0.83, 0.94, None, (0.02, -0.03, 0.07), None, None),
            ("finetune", 1.0, 70, 0.87, 0.81, 0.93, None, None, None, None)]
    sentences = study.findings(_summary(rows))
    assert ("Fine-tuning losing to feature extraction at 10% is more likely its recipe than the data: it starts "
            "from the same features with more freedom. " + study.RECIPE_CHECKS) in sentences
    assert not any("negative transfer" in s.lower() and "rule out" not in s for s in sentences), sentences


def test_findings_without_negative_transfer_say_so():
    rows = [r for r in PLANTED if r[0] in ("scratch", "finetune")]
    sentences = study.findings(_summary(rows))
    assert "No negative transfer observed: no pretrained strategy's test AUC is below scratch's with a 95% CI " \
           "excluding 0, at any fraction." in sentences
    assert not any("Feature extraction" in s or "reached with" in s for s in sentences)
    # fine-tuning better where planted, never below scratch
    assert sentences[0].startswith("At 10% of the training data (8 patients): fine-tuning beats scratch by +0.12")


def test_findings_say_when_no_model_beats_chance_and_how_wide_the_differences_are():
    rows = [(s, f, n, auc - 0.3, lo - 0.3, hi - 0.3, *rest) for s, f, n, auc, lo, hi, *rest in PLANTED]
    sentences = study.findings(_summary(rows))
    assert ("No test AUC is above chance (every 95% CI includes 0.5 or lies below it): on this test set the study "
            "cannot show that any strategy learned the task; below chance: scratch at 10% (0.30) and gradual unfreezing at 10% (0.35).") in sentences
    few = [(s, f, n, *((auc, lo, hi) if f == 1.0 and s != "feature_extraction" else (0.5, 0.4, 0.6)), *rest)
           for s, f, n, auc, lo, hi, *rest in PLANTED]
    assert any(s == ("Test AUC is above chance (its 95% CI excludes 0.5) in 3 of 12 strategy × fraction cells: "
                     "scratch at 100%, fine-tuning at 100% and gradual unfreezing at 100%.")
               for s in study.findings(_summary(few)))
    wide = _summary(PLANTED)
    for ref in ("scratch", "finetune"):
        wide[f"vs_{ref}_lo"] -= 0.2
        wide[f"vs_{ref}_hi"] += 0.2
    assert any(s.startswith("Resolution: the paired 95% CIs of the differences are ±0.27 AUC wide (median "
                            "half-width) on 15 test patients") for s in study.findings(wide))


def test_findings_when_feature_extraction_is_never_within_ci_or_only_at_some_fractions():
    def fe_vs_ft(values):
        rows = []
        for row, value in zip([r for r in PLANTED if r[0] == "feature_extraction"], values):
            rows.append((*row[:7], value, *row[8:]))
        return [r for r in PLANTED if r[0] == "finetune"] + rows

    never = study.findings(_summary(fe_vs_ft([(0.10, 0.02, 0.18), (-0.2, -0.3, -0.1), (-0.1, -0.2, -0.05)])))
    assert ("Feature extraction is within CI of fine-tuning at no fraction; fine-tuning is better at 25% (+0.20 AUC, "
            "95% CI +0.10 to +0.30) and 100% (+0.10 AUC, 95% CI +0.05 to +0.20); feature extraction is better at "
            "10% (+0.10 AUC, 95% CI +0.02 to +0.18).") in never
    gaps = study.findings(_summary(fe_vs_ft([(0.0, -0.1, 0.1), (-0.2, -0.3, -0.1), (0.0, -0.1, 0.1)])))
    assert any(s.startswith("Feature extraction is within CI of fine-tuning at 10% and 100%;") for s in gaps)


# --------------------------------------------------------------------------------------- report


def _table_and_curves(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = summary[["strategy", "fraction", "train_patients", "test_auc", "test_auc_lo", "test_auc_hi",
                     "epochs_to_target", "time_to_target_s", "train_time_s"]].assign(
        experiment=[study.run_name("study", s, f, 0) for s, f in zip(summary["strategy"], summary["fraction"])],
        seed=0, train_images=50, val_images=40, test_images=38, epochs_run=5, best_epoch=3, best_val_auc=0.8)
    curves = pd.concat([pd.DataFrame({"experiment": r.experiment, "strategy": r.strategy, "fraction": r.fraction,
                                      "seed": 0, "epoch": range(1, 6), "val_auc": np.linspace(0.5, r.test_auc, 5),
                                      "elapsed_s": np.arange(1, 6) * 10.0}) for r in table.itertuples()])
    return table, curves


def test_report_writes_the_markdown_tables_and_figures(tmp_path):
    summary = _summary(PLANTED)
    table, curves = _table_and_curves(summary)
    grid = study.StudyGrid(fractions=[0.1, 0.25, 1.0], epochs=5, target_val_auc=0.7)
    sentences = study.findings(summary, 0.7)
    paths = study.report(table, summary, curves, sentences, tmp_path, grid, "cpu", wall_s=600)
    text = paths["markdown"].read_text()
    assert "12 runs =\n4 strategies × 3 training-data fractions × 1 seed(s)" in text
    assert "study/learning_curve.png" in text and "study/convergence.png" in text
    assert all(f"- {s}" in text for s in sentences)
    assert "| fine-tuning | 10% | 8 | 0.720 [0.600, 0.840] | +0.120 [+0.030, +0.210] | – |" in text
    for name in ("learning_curve", "convergence"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = pd.read_csv(paths["table"])
    assert len(written) == 12 and not written.isna().any().any()
    assert set(written["epochs_to_target"].astype(str)) >= {study.NOT_REACHED, "2"}


# ---------------------------------------------------------------------------------- end to end


def _git(proj: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=medtl-test", "-c", "user.email=test@medtl.invalid", *args], cwd=proj,
                   check=True, capture_output=True)


@pytest.mark.slow
def test_tiny_grid_end_to_end_through_medtl_study(tmp_path):
    """2 strategies x 2 fractions x 1 seed, one epoch, on the shrunk project: report, table, experiments."""
    proj = scratch_project(tmp_path)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["study"]["grids"]["tiny"] = {
        "strategies": ["scratch", "finetune"], "fractions": [0.5, 1.0], "seeds": [0], "epochs": 1,
        "target_val_auc": 0.5, "jobs": 1, "n_boot": 100,
        "overrides": {"evaluate.n_boot": 50, "evaluate.gradcam_examples": 0, "evaluate.subgroups": []}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(proj, "commit", "-qam", "tiny study grid")
    # a newcomer's machine: an empty HOME, no git identity anywhere (the experiments must still commit)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", HOME=str(home),
               GIT_CONFIG_NOSYSTEM="1", XDG_CONFIG_HOME=str(home / ".config"))
    assert subprocess.run(["git", "config", "user.email"], cwd=proj, env=env, capture_output=True).returncode != 0
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "study", "--grid", "tiny", "--quiet"], cwd=proj,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (home / ".gitconfig").exists() and "[user]" not in (proj / ".git/config").read_text(), \
        "the study left the user's git config alone"
    assert "study: 4 runs in" in done.stdout and "- Highest test AUC per fraction: 50%:" in done.stdout

    reports = proj / "reports"
    text = (reports / "study.md").read_text()
    assert "## Findings" in text and "| fine-tuning | 50% |" in text
    assert (reports / "study/learning_curve.png").stat().st_size > 0
    assert (reports / "study/convergence.png").stat().st_size > 0
    table = pd.read_csv(reports / "study.csv")
    assert len(table) == 4 and not table.isna().any().any(), table.to_string()
    assert set(zip(table["strategy"], table["fraction"])) == {(s, f) for s in ("scratch", "finetune") for f in (0.5, 1.0)}
    half, whole = (table[table["fraction"] == f] for f in (0.5, 1.0))
    assert (half["train_patients"].to_numpy() < whole["train_patients"].to_numpy()).all()
    assert table["test_images"].nunique() == 1 and table["val_images"].nunique() == 1

    shown = _dvc(proj, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    json.loads(shown.stdout)
    assert all(name in shown.stdout for name in table["experiment"]), shown.stdout[:2000]
    assert "auc_ci_lo" in shown.stdout and "train_patients" in shown.stdout, "experiments carry their metrics"
    first, last = table["experiment"].iloc[0], table["experiment"].iloc[-1]
    diff = _dvc(proj, "plots", "diff", first, last, "-o", str(tmp_path / "plots"))
    assert diff.returncode == 0, diff.stdout + diff.stderr
    html = (tmp_path / "plots/index.html").read_text()
    assert first in html and last in html and "ROC (test)" in html and "metrics/val/auc.tsv" in html
