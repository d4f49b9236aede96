"""Fan-out runners: order, init and errors for each; ingest and preprocess on a Dask cluster equal the default."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.fanout import FanoutParams, WorkerDied, map_ordered, preserved_environ
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
    with preserved_environ(), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
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
    environ = dict(os.environ)
    results = list(map_ordered(_scale, items, init=_set_factor, init_args=(factor,), params=params, workers=2,
                               desc="test"))
    assert [value for value, _ in results] == [factor * x for x in items]
    # a local Dask cluster sets OMP_NUM_THREADS=1 & co. in this process: a later training run would get one thread
    assert dict(os.environ) == environ, "the fan-out changed this process's environment"
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
# a worker process that dies: the process runner carries on, and names the item

_BAD: frozenset = frozenset()
_HOW = "exit"


def _set_bad(bad: tuple, how: str = "exit") -> None:
    global _BAD, _HOW
    _BAD, _HOW = frozenset(bad), how


def _die_on_bad(x):
    """``x * 3``, except that the process dies on the items set by :func:`_set_bad` (and raises on 'raise')."""
    if x in _BAD:
        if _HOW == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(1)
    if x == "raise":
        raise ValueError("a plain error after a crash")
    return x * 3


_CRASH_CALLS: list = []  # on_crash runs in this process


def _crashed(item, reason: str) -> tuple:
    _CRASH_CALLS.append(item)
    return "crashed", item, reason


def _exit_in_init() -> None:
    os._exit(3)


def _slow_pid(_x) -> int:
    time.sleep(0.05)
    return os.getpid()


def _process(chunk: int = 4) -> FanoutParams:
    return FanoutParams(runner="process", chunk=chunk)


@pytest.mark.parametrize(("how", "exit_code"), [("exit", "exit code 1"), ("sigkill", "exit code -9, SIGKILL")])
def test_a_dead_worker_costs_its_item_only(how, exit_code):
    items = list(range(40))
    _CRASH_CALLS.clear()
    results = list(map_ordered(_die_on_bad, items, init=_set_bad, init_args=((17,), how), params=_process(), workers=2,
                               on_crash=_crashed))
    assert len(results) == len(items) and _CRASH_CALLS == [17]
    assert results[:17] == [3 * x for x in range(17)] and results[18:] == [3 * x for x in range(18, 40)]
    assert results[17] == ("crashed", 17, f"worker process died ({exit_code}) while processing this item")


def test_without_on_crash_the_error_names_the_item_after_the_results_before_it():
    got = []
    with pytest.raises(WorkerDied, match=r"^item 17 \(17\): worker process died \(exit code 1\)") as caught:
        for result in map_ordered(_die_on_bad, range(40), init=_set_bad, init_args=((17,),), params=_process(),
                                  workers=2):
            got.append(result)
    assert got == [3 * x for x in range(17)], "the results before the item come first, in order"
    assert caught.value.index == 17 and caught.value.item == 17
    assert isinstance(caught.value, BrokenProcessPool)  # what callers caught before


def test_the_error_shows_a_long_item_truncated():
    long = "x" * 1000
    with pytest.raises(WorkerDied) as caught:
        list(map_ordered(_die_on_bad, ["a", long, "b"], init=_set_bad, init_args=((long,),), params=_process(1),
                         workers=2))
    message = str(caught.value)
    assert message.startswith("item 1 ('xxxx") and "..." in message and len(message) < 250, message


def test_two_bad_items_in_one_chunk_and_one_in_another():
    bad = (9, 10, 30)  # chunk 8: items 8-15
    _CRASH_CALLS.clear()
    results = list(map_ordered(_die_on_bad, range(40), init=_set_bad, init_args=(bad, "sigkill"), params=_process(8),
                               workers=2, on_crash=_crashed))
    assert [r[:2] if isinstance(r, tuple) else r for r in results] == \
        [("crashed", x) if x in bad else 3 * x for x in range(40)]
    assert _CRASH_CALLS == list(bad)


def test_a_plain_error_after_a_crash_still_surfaces_in_its_place():
    items = [*range(20), "raise", *range(21, 30)]
    got = []
    with pytest.raises(ValueError, match="a plain error after a crash"):
        for result in map_ordered(_die_on_bad, items, init=_set_bad, init_args=((5,),), params=_process(), workers=2,
                                  on_crash=_crashed):
            got.append(result)
    # as without a crash, the error loses the results of its chunk (4 items) and those after it
    assert 17 <= len(got) <= 20 and got[5][:2] == ("crashed", 5)
    assert got == [got[5] if x == 5 else 3 * x for x in range(len(got))]


def test_workers_that_die_in_init_end_the_call():
    with pytest.raises(BrokenProcessPool, match="no item running") as caught:
        list(map_ordered(_die_on_bad, range(10), init=_exit_in_init, params=_process(), workers=2, on_crash=_crashed))
    assert not isinstance(caught.value, WorkerDied)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pool_workers_die_with_their_parent():
    code = (
        "from pipeline.fanout import FanoutParams, map_ordered\n"
        "from tests.pipeline.test_fanout import _slow_pid, _set_factor\n"
        "for pid in map_ordered(_slow_pid, range(2000), init=_set_factor, init_args=(1,),"
        " params=FanoutParams(chunk=1), workers=2):\n"
        "    print(pid, flush=True)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(int(parent.stdout.readline()))
        assert len(pids) == 2 and parent.pid not in pids
        assert all(_alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "pool workers outlived their killed parent"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_parent_died_before_it_asked_exits():
    code = (
        "import ctypes, os, subprocess, sys\n"
        "from pipeline.fanout import _die_with_parent\n"
        "_die_with_parent(os.getppid(), True)\n"
        "sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)\n"  # PR_GET_PDEATHSIG
        "print(sig.value, flush=True)\n"
        "gone = subprocess.Popen(['true']); gone.wait()\n"
        "_die_with_parent(gone.pid, False)\n"  # forkserver: the parent is asked about by pid
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, f"{int(signal.SIGKILL)}\n"), done.stderr
    other = subprocess.run([sys.executable, "-c", "import os; from pipeline.fanout import _die_with_parent;"
                            " _die_with_parent(os.getppid() + 1, True); print('still here')"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (other.returncode, other.stdout) == (1, ""), other.stderr


@pytest.mark.slow
@pytest.mark.xdist_group("prefect")
def test_a_dead_dask_worker_costs_its_item_only(harness):
    distributed = pytest.importorskip("distributed", reason="prefect-dask (dask.distributed) is not installed")
    pytest.importorskip("prefect_dask", reason="prefect-dask is not installed")
    import dask

    # no retries by Dask of a task whose worker died: each is a worker restart (seconds)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), preserved_environ(), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as cluster:
        params = FanoutParams(runner="dask", address=cluster.scheduler_address, chunk=4)
        results = list(map_ordered(_die_on_bad, range(12), init=_set_bad, init_args=((6,),), params=params,
                                   workers=2, desc="test", on_crash=_crashed))
        assert results[:6] + results[7:] == [3 * x for x in range(12) if x != 6]
        assert results[6][:2] == ("crashed", 6) and "KilledWorker" in results[6][2]
        with pytest.raises(WorkerDied, match=r"^item 6 \(6\): Dask worker"):
            list(map_ordered(_die_on_bad, range(12), init=_set_bad, init_args=((6,),), params=params, workers=2,
                             desc="test"))

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
