"""Fan-out runners: order, init and errors for each; ingest and preprocess on a Dask cluster equal the default."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.fanout import FanoutParams, map_ordered
from pipeline.params import load_section
from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]
# Prefect runners: one test server per xdist worker (~30 s to start here), so grouped, and slow.
PREFECT = (pytest.mark.xdist_group("prefect"), pytest.mark.slow)

# Module level, so that worker processes (pool or Dask) can import them by name.
_FACTOR: int | None = None


def _set_factor(factor: int) -> None:
    global _FACTOR
    _FACTOR = factor


def _scale(x: int) -> tuple[int, int]:
    if x == 13:
        raise ValueError("item 13 is unlucky")
    return x * _FACTOR, os.getpid()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def dask_address():
    """A local Dask cluster of two single-threaded worker processes: stands in for a real one."""
    distributed = pytest.importorskip("distributed", reason="prefect-dask (dask.distributed) is not installed")
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


RUNNERS = [
    pytest.param("inline", False, id="inline"),
    pytest.param("process", False, id="process"),
    pytest.param("thread", False, id="thread", marks=PREFECT),
    pytest.param("dask", True, id="dask-address", marks=PREFECT),
    pytest.param("dask", False, id="dask-local", marks=PREFECT),  # a temporary cluster of its own
]


def _fanout(request, runner: str, at_address: bool, chunk: int = 0) -> FanoutParams:
    if runner in ("thread", "dask"):
        request.getfixturevalue("harness")
    address = request.getfixturevalue("dask_address") if at_address else None
    return FanoutParams(runner=runner, address=address, chunk=chunk)


@pytest.mark.parametrize(("runner", "at_address"), RUNNERS)
def test_results_in_input_order_after_init_in_the_worker(request, runner, at_address):
    params = _fanout(request, runner, at_address, chunk=8)  # 40 items: 5 chunks, more than the workers
    factor = 2 + [p.id for p in RUNNERS].index(request.node.callspec.id)  # a new value: init must run again
    items = [x for x in range(41) if x != 13]
    results = list(map_ordered(_scale, items, init=_set_factor, init_args=(factor,), params=params, workers=2,
                               desc="test"))
    assert [value for value, _ in results] == [factor * x for x in items]
    pids = {pid for _, pid in results}
    if runner in ("inline", "thread"):
        assert pids == {os.getpid()}
    else:  # ran in other processes, each of which had run init (else _FACTOR would be None there)
        assert os.getpid() not in pids and 1 <= len(pids) <= 2


@pytest.mark.parametrize(("runner", "at_address"), RUNNERS[:4])
def test_an_exception_in_fn_surfaces_with_its_message(request, runner, at_address):
    params = _fanout(request, runner, at_address)
    with pytest.raises(ValueError, match="item 13 is unlucky"):
        list(map_ordered(_scale, range(20), init=_set_factor, init_args=(1,), params=params, workers=2, desc="test"))


def test_bad_fanout_params_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"fanout\.runner must be one of .*'spark'"):
        FanoutParams(runner="spark")
    with pytest.raises(ValueError, match=r"fanout\.chunk .* got -1"):
        FanoutParams(chunk=-1)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("fanout:\n  runner: processes\n")
    with pytest.raises(ValueError, match="'processes'"):
        load_section(FanoutParams, params_file, "fanout")
    assert load_section(FanoutParams, ROOT / "params.yaml", "fanout") == FanoutParams(), \
        "the shipped default must stay the local process pool"


def test_default_runs_never_import_prefect():
    """The default (process) and inline runners, and the stages' imports, leave Prefect out."""
    code = (
        "import sys; import pipeline.cli, pipeline.ingest, pipeline.preprocess\n"
        "from pipeline.fanout import FanoutParams, map_ordered\n"
        "from tests.pipeline.test_fanout import _scale, _set_factor\n"
        "for runner in ('process', 'inline'):\n"
        "    out = list(map_ordered(_scale, range(8), init=_set_factor, init_args=(2,),"
        " params=FanoutParams(runner=runner), workers=2))\n"
        "    assert [v for v, _ in out] == list(range(0, 16, 2))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'prefect_dask', 'distributed')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "Prefect or Dask was imported by the default path"


# --------------------------------------------------------------------------------------------------
# the real thing: ingest and preprocess on a Dask cluster give what the local process pool gives


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.xdist_group("prefect")
def test_ingest_and_preprocess_on_dask_equal_the_process_pool(harness, dask_address, cohort, ingested, tmp_path):
    # imported here: Dask workers import this module for _scale, spare them torch
    from pipeline import ingest, preprocess

    on_dask = FanoutParams(runner="dask", address=dask_address)
    process_dir, process_summary = ingested  # the session's ingest: process runner, 2 workers
    dask_dir = tmp_path / "ingest"
    dask_summary = ingest.run(ingest.IngestParams(workers=2), cohort, cohort / "labels.csv", dask_dir, key=TEST_KEY,
                              fanout=on_dask)
    assert dask_summary.run["runner"] == "dask" and dask_summary.run["new_files"] == dask_summary.files_seen
    pd.testing.assert_frame_equal(pd.read_parquet(dask_dir / "manifest.parquet"),
                                  pd.read_parquet(process_dir / "manifest.parquet"))
    assert (dask_dir / "rejected.csv").read_text() == (process_dir / "rejected.csv").read_text()
    assert _tree(dask_dir / "dicom") == _tree(process_dir / "dicom"), "de-identified files differ"
    assert {k: v for k, v in vars(dask_summary).items() if k != "run"} == \
        {k: v for k, v in vars(process_summary).items() if k != "run"}

    # dataset_percentile: the fingerprint's first pass fans out too
    params = preprocess.PreprocessParams(size=32, workers=2, fingerprint_sample=4,
                                         window={"CT": "lung", "default": "dataset_percentile"})
    preprocess.run(params, process_dir, tmp_path / "process")
    preprocess.run(params, dask_dir, tmp_path / "dask", fanout=on_dask)
    a, b = tmp_path / "process", tmp_path / "dask"
    assert (a / "tensors.npy").read_bytes() == (b / "tensors.npy").read_bytes()
    assert np.load(b / "tensors.npy").shape[0] == len(pd.read_parquet(b / "index.parquet")) > 0
    pd.testing.assert_frame_equal(pd.read_parquet(a / "index.parquet"), pd.read_parquet(b / "index.parquet"))
    assert (a / "rejected.csv").read_text() == (b / "rejected.csv").read_text()
    assert json.loads((a / "fingerprint.json").read_text()) == json.loads((b / "fingerprint.json").read_text())
