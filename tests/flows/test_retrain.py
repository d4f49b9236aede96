"""The retrain flow end to end on a shrunk synthetic project, against Prefect's ephemeral test server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_dvc_pipeline import scratch_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect")]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    proj = tmp_path_factory.mktemp("flowproject")
    return scratch_project(proj, remote=proj.parent / "remote")


def _artifacts() -> dict[str, list]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_artifacts()
    out: dict[str, list] = {}
    for artifact in found:
        out.setdefault(artifact.key, []).append(artifact)
    return out


@pytest.fixture(scope="module")
def first_run(harness, project) -> dict:
    """The first flow run on the project (tests may run in any order: each asks for it)."""
    from flows.retrain import retrain

    return retrain(repo=str(project), export=True)


def test_first_run_runs_every_stage_publishes_and_promotes(first_run, project):
    from flows.retrain import pipeline_stages

    result = first_run
    assert result["stages"] == {stage: "ran" for stage in pipeline_stages(project)}
    assert list(result["stages"]) == ["synth", "pull", "ingest", "preprocess", "split", "train", "evaluate"]
    assert result["promotion"]["decision"]["promote"] is True
    champion = json.loads((project / "registry/champion.json").read_text())
    assert champion["version"] in (1, "0001", "1")
    assert result["pushed"] == "local" and any((project.parent / "remote").rglob("*"))
    # the new champion exported after its promotion, checked against the PyTorch model on the real tensors
    exported = json.loads((Path(result["exported"]) / "export.json").read_text())
    assert Path(result["exported"]).name == "v0001" and exported["parity"]["images"] == 32
    assert max(exported["parity"][f]["max_abs_diff"] for f in ("torchscript", "onnx", "bundle")) <= 1e-4
    artifacts = _artifacts()
    for key in ("ingest-summary", "test-metrics", "evaluation-report", "promotion-decision", "train-progress"):
        assert key in artifacts, f"artifact {key} missing: {sorted(artifacts)}"
    assert "| AUC |" in artifacts["test-metrics"][0].data
    assert artifacts["train-progress"][0].data == 100.0


def test_second_run_skips_unchanged_stages(first_run, project):
    from flows.retrain import retrain

    lock_before = (project / "dvc.lock").read_text()
    result = retrain(repo=str(project), push=False)
    assert set(result["stages"].values()) == {"skipped"}
    assert (project / "dvc.lock").read_text() == lock_before
    assert result["promotion"]["decision"]["promote"] is False, "the champion itself is not promoted again"


def test_a_failing_stage_fails_the_flow_with_its_error_and_the_rerun_resumes(first_run, project):
    from flows.retrain import retrain

    state = retrain(repo=str(project), overrides={"train.strategy": "bogus"}, promote=False, push=False,
                    return_state=True)
    assert state.is_failed()
    assert "stage train failed" in state.message and "train.strategy" in state.message
    result = retrain(repo=str(project), overrides={"train.strategy": "finetune"}, promote=False, push=False)
    assert result["stages"]["ingest"] == "skipped" and result["stages"]["train"] in {"ran", "skipped"}


def test_a_second_run_on_a_locked_repo_fails_clearly_and_changes_nothing(first_run, project):
    from filelock import FileLock

    from flows.retrain import LOCK_FILE, retrain

    params_before = (project / "params.yaml").read_text()
    with FileLock(str(project / LOCK_FILE)):
        state = retrain(repo=str(project), overrides={"train.epochs": 2}, return_state=True)
    assert state.is_failed() and "another retrain run holds" in state.message
    assert (project / "params.yaml").read_text() == params_before


def test_unknown_override_is_an_error_naming_the_key(first_run, project):
    from flows.retrain import retrain

    state = retrain(repo=str(project), overrides={"train.epoks": 2}, return_state=True)
    assert state.is_failed() and "train.epoks" in state.message
