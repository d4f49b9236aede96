"""Shared fixtures: a small synthetic cohort and its ingest, made once per test session (per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

TEST_KEY = b"medtl-test-key-0123456789abcdef"
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
