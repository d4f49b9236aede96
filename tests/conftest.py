"""Shared fixtures: a small synthetic cohort and its ingest, made once per test session (per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import json

import numpy as np
import pandas as pd
import pytest


def pytest_configure(config):
    """Refuse, before any worker starts, the pytest/pytest-xdist pair known to ignore ``xdist_group``."""
    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    from importlib.metadata import version

    xdist = tuple(int(p) for p in version("pytest-xdist").split(".")[:3] if p.isdigit())
    if pytest.version_tuple[:2] >= (9, 2) and xdist <= (3, 8, 0):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with pytest-xdist {version('pytest-xdist')} ignores xdist_group "
            "(--dist loadgroup): every grouped flow test module would run its fixtures once per worker. "
            "Install the dev extra's versions: scripts/setup.sh dev")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """With ``--dist loadgroup`` (the README's test command), xdist tags each grouped test's node id with
    its group; a pytest it cannot tag (9.2) would silently spread a group over the workers, each running
    the group's module-scoped flows again. Stop with the cause rather than run twice as long."""
    if not getattr(config.option, "loadgroup", False):
        return
    untagged = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if untagged:
        raise pytest.UsageError(
            f"pytest-xdist's loadgroup did not tag {len(untagged)} grouped tests (e.g. {untagged[0]}) under "
            f"pytest {pytest.__version__}: install the versions pyproject.toml's dev extra names (scripts/setup.sh dev)")


os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TEST_KEY = b"medtl-test-key-0123456789abcdef"
TINY_SIZE = 32  # pixels: tiny preprocessed images for train/evaluate tests
COHORT_PATIENTS = 40  # enough for every defect kind and transfer syntax to appear


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A synthetic cohort (read-only for tests: copy it before changing it)."""
    from pipeline import synth

    out = tmp_path_factory.mktemp("cohort") / "synth"
    synth.run(synth.SynthParams(patients=COHORT_PATIENTS, seed=7), out)
    return out


@pytest.fixture(scope="session")
def ingested(cohort, tmp_path_factory):
    """Ingest of :func:`cohort` with the study-keyed labels synth writes: (out_dir, summary)."""
    from pipeline import ingest

    out = tmp_path_factory.mktemp("ingest") / "out"
    summary = ingest.run(ingest.IngestParams(workers=2), cohort, cohort / "labels.csv", out,
                         quarantine_dir=out.parent / "quarantine", key=TEST_KEY)
    return out, summary


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> tuple[Path, Path]:
    """A preprocess-like output: 48 images of 24 patients, lesions a bright blob; and its splits.csv."""
    out = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    n = 48
    labels = np.array(["lesion" if i % 3 == 0 else "normal" for i in range(n // 2)]).repeat(2)
    tensors = rng.normal(0.4, 0.05, (n, 3, TINY_SIZE, TINY_SIZE))
    yy, xx = np.mgrid[:TINY_SIZE, :TINY_SIZE]
    for i in np.flatnonzero(labels == "lesion"):
        cy, cx = rng.integers(8, TINY_SIZE - 8, 2)
        tensors[i, :, (yy - cy) ** 2 + (xx - cx) ** 2 < 16] += 0.4
    np.save(out / "tensors.npy", np.clip(tensors, 0, 1).astype(np.float16))
    patients = [f"P-{i // 2:04d}" for i in range(n)]
    index = pd.DataFrame({"row": np.arange(n), "image_id": [f"{i:016x}" for i in range(n)], "patient_key": patients,
                          "label": labels, "modality": np.array(["DX", "CR", "CT"])[np.arange(n) % 3],
                          "site": np.array(["site-a", "site-b"])[np.arange(n) // 8 % 2]})
    index.to_parquet(out / "index.parquet")
    (out / "fingerprint.json").write_text(json.dumps({"images": n, "params": {"size": TINY_SIZE}}))
    split = np.where(np.arange(n) // 2 % 4 == 0, "val", np.where(np.arange(n) // 2 % 4 == 1, "test", "train"))
    splits = tmp_path_factory.mktemp("splits") / "splits.csv"
    index.assign(split=split)[["image_id", "patient_key", "label", "split"]].to_csv(splits, index=False)
    return out, splits


# ------------------------------------------------------------------ a real PACS (Orthanc) for the pull tests

PACS_PATIENTS = 6  # 13 studies, 20 series, 169 instances (seed 3): small enough to load in ~1.5 s


def _orthanc_or_skip():
    from pipeline.sources import orthanc

    why = orthanc.missing()
    if why:
        pytest.skip(why)
    return orthanc


@pytest.fixture(scope="session")
def pacs_cohort(tmp_path_factory) -> Path:
    """The synthetic cohort the PACS tests load into Orthanc (no defect files: a PACS holds images)."""
    from pipeline import synth

    out = tmp_path_factory.mktemp("pacs_cohort") / "synth"
    synth.run(synth.SynthParams(patients=PACS_PATIENTS, seed=3, defects=False), out)
    return out


@pytest.fixture
def orthanc_server(tmp_path, pacs_cohort):
    """A real Orthanc (DICOMweb + DIMSE, basic auth, own storage, free ports) holding :func:`pacs_cohort`,
    loaded over STOW-RS; stopped after the test."""
    orthanc = _orthanc_or_skip()
    server = orthanc.start(tmp_path / "orthanc")
    try:
        orthanc.load(server, pacs_cohort)
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs_env(orthanc_server, monkeypatch):
    """The server's credentials in the environment, as a site sets them."""
    for key, value in orthanc_server.env().items():
        monkeypatch.setenv(key, value)
    return orthanc_server


def image_files(folder: Path) -> dict[str, Path]:
    """SOPInstanceUID -> path of every image file (pydicom reads it, it has pixel data) under ``folder``."""
    import pydicom

    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                ds = pydicom.dcmread(path)
            except Exception:
                continue
            if "PixelData" in ds:
                out[str(ds.SOPInstanceUID)] = path
    return out
