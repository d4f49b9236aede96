"""The predict flow scores what arrived, marks which studies are new, and publishes its summary artifact."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

from tests.pipeline.test_predict import _model_dir

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect")]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_the_flow_scores_new_arrivals_with_a_registry_version_and_publishes_counts(harness, cohort, tmp_path,
                                                                                  monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.predict import predict_flow

    monkeypatch.setenv("MEDTL_PSEUDONYM_KEY", "q8ZsT3vN0xLr7WbK2mYc5HdJ")  # a strong key, as a site sets it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"workers": 1}, "predict": {"batch_size": 8, "device": "cpu"}, "promote": {"registry": "registry"},
        "data": {"raw_dir": "incoming", "labels": "none.csv", "lesions": "none"}}))
    version = _model_dir(tmp_path / "staging")
    shutil.copytree(version, tmp_path / "registry/versions/0003")
    patients = sorted(p for p in (cohort / "DICOM").glob("*/*") if p.is_dir())
    incoming = tmp_path / "incoming"
    for patient in patients[:2]:
        shutil.copytree(patient, incoming / patient.name)

    first = predict_flow(repo=str(tmp_path), version=3)
    assert first["model"]["version"] is None and first["counts"]["new_studies"] == first["counts"]["studies"] > 0
    shutil.copytree(patients[2], incoming / patients[2].name)  # a new patient arrives
    second = predict_flow(repo=str(tmp_path), version=3)
    studies = pd.read_csv(tmp_path / "data/predict/results/studies.csv")
    assert second["counts"]["studies"] == len(studies) > first["counts"]["studies"]
    assert 0 < second["counts"]["new_studies"] == int(studies["new"].sum()) < len(studies)
    with get_client(sync_client=True) as client:
        artifacts = sorted((a for a in client.read_artifacts() if a.key == "predict-summary"), key=lambda a: a.created)
    assert len(artifacts) >= 2
    assert f"| new studies (since the last run) | {second['counts']['new_studies']} |" in artifacts[-1].data
    assert f"| new studies (since the last run) | {first['counts']['new_studies']} |" in artifacts[-2].data
    with pytest.raises(Exception, match="no version 7"):
        predict_flow(repo=str(tmp_path), version=7)


def test_every_deployment_in_prefect_yaml_names_a_flow_and_its_parameters():
    import importlib
    import inspect
    from pathlib import Path

    from prefect import Flow

    root = Path(__file__).resolve().parents[2]
    for deployment in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]:
        module, _, name = deployment["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow), deployment["name"]
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(deployment.get("parameters", {})) <= accepted, deployment["name"]
