"""From a PACS and back: the retrain flow pulls its cohort from a real Orthanc (DICOMweb), trains and
promotes; predict --pacs then scores the studies and stores one SR into each, which a QIDO query finds.
A stopped server fails the flow with one line naming it, after the pull task's retries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.test_dvc_pipeline import scratch_project

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect")]
SITE_KEY = "q8ZsT3vN0xLr7WbK2mYc5HdJ-pacs-flow-test"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Orthanc holding a 20-patient synthetic cohort (what the shrunk project trains on)."""
    from pipeline import synth
    from pipeline.sources import orthanc

    why = orthanc.missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("pacs_flow")
    cohort = root / "cohort"
    synth.run(synth.SynthParams(patients=20, seed=11, defects=False), cohort)
    srv = orthanc.start(root / "orthanc")
    try:
        srv.stored = orthanc.load(srv, cohort)
        srv.cohort = cohort
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory, server) -> Path:
    proj = scratch_project(tmp_path_factory.mktemp("pacsproject"))
    (proj / "labels").mkdir()
    shutil.copy(server.cohort / "labels.csv", proj / "labels" / "labels.csv")  # as a RIS exports it: by study UID
    shutil.copy(server.cohort / "lesions.csv", proj / "labels" / "lesions.csv")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"].update(source="dicomweb", raw_dir="data/raw/pacs", labels="labels/labels.csv",
                          lesions="labels/lesions.csv")
    params["pacs"].update(url=server.dicomweb_url, retries=0, timeout_s=20)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def env(server):
    patch = pytest.MonkeyPatch()
    for key, value in {**server.env(), "MEDTL_PSEUDONYM_KEY": SITE_KEY}.items():
        patch.setenv(key, value)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def first_run(harness, env, project):
    from flows.retrain import retrain

    return retrain(repo=str(project), push=False, pull_retries=0)


def test_the_retrain_flow_pulls_its_cohort_from_the_pacs_and_trains_on_it(first_run, project, server):
    assert first_run["stages"]["pull"] == "ran" and first_run["stages"]["train"] == "ran"
    assert first_run["promotion"]["decision"]["promote"] is True
    pulled = json.loads((project / "data/pull/summary.json").read_text())
    assert pulled["instances_retrieved"] == server.stored and pulled["studies_failed"] == 0
    ingest = json.loads((project / "data/interim/ingest/summary.json").read_text())
    assert ingest["files_seen"] == server.stored and ingest["ingested"] == server.stored
    assert ingest["patients"] == 20 and ingest["label_key"] == "study_instance_uid"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts()}
    assert "pull-summary" in artifacts and f"| {pulled['studies_queried']} |" in artifacts["pull-summary"].data
    assert server.password not in artifacts["pull-summary"].data


def test_a_second_run_pulls_nothing_new_and_retrains_nothing(first_run, project):
    from flows.retrain import retrain

    result = retrain(repo=str(project), push=False, promote=False, pull_retries=0)
    assert result["stages"]["pull"] == "ran", "the PACS is always asked"
    assert {s: r for s, r in result["stages"].items() if s != "pull"} == {
        s: "skipped" for s in result["stages"] if s != "pull"}
    pulled = json.loads((project / "data/pull/summary.json").read_text())
    assert pulled["studies_unchanged"] == pulled["studies_queried"] > 0 and pulled["instances_retrieved"] == 0


def test_predict_from_the_pacs_stores_one_sr_into_each_study_once(first_run, project, server, tmp_path):
    from pipeline import predict
    from pipeline.sources import pacs

    params = pacs.PacsParams(url=server.dicomweb_url, retries=0)
    client = pacs.DicomwebClient(params, pacs.credentials(params))
    studies_before = {s.uid for s in client.studies()}
    kwargs = dict(local_dir=tmp_path / "local", registry=project / "registry", work_dir=tmp_path / "work")
    summary = predict.run_from_pacs(predict.PredictParams(device="cpu"), "dicomweb", params, tmp_path / "results",
                                    **kwargs)
    assert summary["pull"]["studies_retrieved"] == len(studies_before)
    assert summary["stored"]["stored"] == summary["counts"]["structured_reports"] == len(studies_before)
    for study in studies_before:
        sr_series = [s for s in client.series(study) if s.modality == "SR"]
        assert len(sr_series) == 1 and sr_series[0].n_instances == 1, "one SR in each study"
    assert {s.uid for s in client.studies()} == studies_before, "results went into the existing studies"
    again = predict.run_from_pacs(predict.PredictParams(device="cpu"), "dicomweb", params, tmp_path / "results",
                                  **kwargs)
    assert again["stored"]["stored"] == 0 and again["stored"]["already_present"] == len(studies_before)
    assert again["pull"]["instances_retrieved"] == 0, "the SRs medtl stored are not pulled as input"
    for study in studies_before:
        assert sum(s.n_instances for s in client.series(study) if s.modality == "SR") == 1, "no duplicate SR"


def test_the_predict_flow_on_a_pacs_source_pulls_scores_and_reports_what_it_stored(first_run, project, server):
    from prefect.client.orchestration import get_client

    from flows.predict import predict_flow

    summary = predict_flow(repo=str(project))
    assert summary["pull"]["studies_retrieved"] == summary["counts"]["studies"] > 0
    assert summary["stored"]["stored"] + summary["stored"]["already_present"] == summary["counts"]["studies"]
    with get_client(sync_client=True) as client:
        artifacts = [a for a in client.read_artifacts() if a.key == "predict-summary"]
    assert any("results stored into their studies" in a.data for a in artifacts)


def test_a_stopped_server_fails_the_flow_with_one_line_naming_it(first_run, project, server):
    from flows.retrain import retrain

    server.stop()
    state = retrain(repo=str(project), push=False, promote=False, pull_retries=1, pull_retry_delay_s=0,
                    return_state=True)
    assert state.is_failed()
    assert "stage pull failed: pacs " + server.dicomweb_url in state.message and "cannot connect" in state.message
    assert server.password not in state.message
