"""The real dvc.yaml and params.yaml, shrunk, run by `dvc repro` in a scratch copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)  # the full default run on a loaded 2-core machine


def scratch_project(proj: Path, shrink: bool = True, remote: Path | None = None) -> Path:
    """A git + DVC project in ``proj`` with this repository's dvc.yaml, params.yaml and pipeline/.

    ``shrink``: the real config, shrunk (20 patients, 64 px images, one epoch, 50 bootstrap resamples).
    ``remote``: a default local DVC remote.
    """
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "pipeline", proj / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    if shrink:
        params = yaml.safe_load((proj / "params.yaml").read_text())
        params["synth"]["patients"] = 20  # val and test need patients of both classes
        params["ingest"]["workers"] = 1
        params["preprocess"]["size"] = 64
        params["train"].update(epochs=1, batch_size=8)
        params["evaluate"].update(n_boot=50, gradcam_examples=1)
        params["promote"].update(n_boot=50)
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    assert _dvc(proj, "init", "-q").returncode == 0
    if remote is not None:
        assert _dvc(proj, "remote", "add", "-d", "local", str(remote)).returncode == 0
    git = ["git", "-c", "user.name=medtl-test", "-c", "user.email=test@medtl.invalid"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=proj, check=True)
    return proj


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return scratch_project(tmp_path_factory.mktemp("project"))


@pytest.mark.slow
def test_dvc_repro_runs_the_stages_then_is_a_no_op(project):
    first = _dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((project / "data/interim/ingest/summary.json").read_text())
    assert summary["files_seen"] == summary["ingested"] + sum(summary["rejected"].values())
    assert summary["patients"] > 0 and (project / "data/interim/ingest/manifest.parquet").is_file()
    assert (project / "dvc.lock").is_file()
    fingerprint = json.loads((project / "data/processed/images/fingerprint.json").read_text())
    assert fingerprint["tensor"]["shape"][0] == fingerprint["images"] > 0
    assert (project / "data/processed/images/tensors.npy").stat().st_size > 0
    split = json.loads((project / "data/processed/split_summary.json").read_text())
    assert split["patients_in_multiple_splits"] == 0
    assert split["cross_patient_duplicate_groups"] == 0, "distinct synthetic patients were merged as duplicates"
    assert sum(split["images"].values()) == fingerprint["images"]
    card = json.loads((project / "models/model_card.json").read_text())
    assert card["input_spec"]["shape"] == [3, 64, 64] and card["training"]["epochs_run"] == 1
    assert card["weights"]["backbone_tensors_loaded"] == card["weights"]["backbone_tensors"] > 0
    assert (project / "models/model.pt").is_file() and (project / "models/checkpoints/last.pt").is_file()
    test = json.loads((project / "reports/metrics.json").read_text())["test"]
    assert test["n_images"] > 0 and len(test["auc_ci"]) == 2
    assert (project / "reports/report.html").is_file() and (project / "reports/figures/roc.png").is_file()

    second = _dvc(project, "repro")
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout, second.stdout
    status = _dvc(project, "status")
    assert "up to date" in status.stdout.lower(), status.stdout

    metrics = _dvc(project, "metrics", "show", "--json")
    assert metrics.returncode == 0 and "files_seen" in metrics.stdout and "best_val_auc" in metrics.stdout
    plots = _dvc(project, "plots", "show", "--json")
    shown = plots.stdout.replace("\\", "/")
    assert plots.returncode == 0 and "val/auc" in shown and "ROC (test)" in shown, plots.stdout[:2000]
    summary = subprocess.run([sys.executable, "-m", "pipeline.cli", "summary"], cwd=project, capture_output=True,
                             text=True, timeout=120)
    assert summary.returncode == 0 and "| AUC |" in summary.stdout, summary.stderr


@pytest.mark.slow
def test_raw_data_is_never_pushed(project):
    """The raw (PHI) cohort is a push: false output; `dvc push` to a local remote leaves it out."""
    if not (project / "dvc.lock").exists():
        assert _dvc(project, "repro").returncode == 0
    remote = project.parent / "remote"
    assert _dvc(project, "remote", "add", "-d", "local", str(remote)).returncode == 0
    push = _dvc(project, "push")
    assert push.returncode == 0, push.stderr
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    raw_md5 = lock["stages"]["synth"]["outs"][0]["md5"].removesuffix(".dir")
    pushed = {p.parent.name + p.name for p in remote.rglob("*") if p.is_file()}
    assert raw_md5 not in {name.removesuffix(".dir") for name in pushed}
    manifest_md5 = next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"].endswith("manifest.parquet"))
    assert manifest_md5 in pushed, "de-identified outputs should be pushed"
    # nothing pushed names an input file: paths of exports often hold patient names and MRNs
    raw = project / "data/raw/synth"
    relpaths = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    folders = {part for rel in relpaths for part in rel.split("/")[:-1] if len(part) >= 6 and part != "DICOM"}
    needles = sorted({rel for rel in relpaths if "/" in rel} | folders, key=len, reverse=True)
    assert len(folders) >= 20, "the cohort's patient folders are what to look for"
    pattern = re.compile("|".join(re.escape(n) for n in needles).encode())
    leaks = {p.name: m.group().decode() for p in remote.rglob("*") if p.is_file()
             for m in [pattern.search(p.read_bytes())] if m}
    assert not leaks, f"input paths in pushed files: {dict(list(leaks.items())[:5])}"


@pytest.mark.slow
def test_medtl_promote_makes_the_first_model_the_champion(project):
    """`medtl promote` (the step the retrain flow runs) from the command line, with the project's default paths."""
    if not (project / "dvc.lock").exists():
        assert _dvc(project, "repro").returncode == 0
    registry = project.parent / "promote-registry"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "promote", "--registry", str(registry)], cwd=project,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("promote: promoted"), done.stdout
    champion = json.loads((registry / "champion.json").read_text())
    assert champion["version"] == 1 and (registry / champion["path"] / "model.pt").is_file()
    decision = json.loads((project / "reports/promotion.json").read_text())["decision"]
    assert decision["promote"] is True


def test_every_stage_path_of_pipeline_paths_is_one_dvc_yaml_declares():
    """pipeline/paths.py and dvc.yaml name the same outputs: a stage output renamed in one only fails here."""
    from pipeline import paths

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "deps"):
            for item in stage.get(kind, []):
                declared.add(next(iter(item)) if isinstance(item, dict) else item)
    join = paths.in_project
    stage_paths = [join(paths.INGEST_DIR, paths.INGEST_SUMMARY), paths.IMAGES_DIR,
                   join(paths.SPLITS_DIR, paths.SPLITS_CSV), join(paths.MODELS_DIR, paths.MODEL),
                   join(paths.MODELS_DIR, paths.MODEL_CARD), join(paths.MODELS_DIR, paths.TRAIN_METRICS),
                   join(paths.MODELS_DIR, paths.VAL_AUC_TSV), join(paths.MODELS_DIR, paths.ELAPSED_TSV),
                   join(paths.REPORTS_DIR, paths.METRICS), join(paths.REPORTS_DIR, paths.PREDICTIONS),
                   join(paths.REPORTS_DIR, paths.REPORT_MD), join(paths.REPORTS_DIR, paths.REPORT_HTML)]
    def related(p: str, d: str) -> bool:  # the same, inside a declared directory, or the folder of declared files
        return p == d or p.startswith(d.rstrip("/") + "/") or d.startswith(p + "/")

    undeclared = [p for p in stage_paths if not any(related(p, d) for d in declared)]
    assert not undeclared, f"in pipeline/paths.py but not in dvc.yaml: {undeclared}"
    # the registry and promotion record are written by promote, outside DVC: never a stage output
    assert not {join(paths.REPORTS_DIR, paths.PROMOTION), paths.REGISTRY_DIR} & declared
