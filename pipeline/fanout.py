"""Fan-out: a stage's per-file work over processes, threads or a Dask cluster, results in input order.

Ingest (scan, rewrite) and preprocess (fingerprint sample, tensors) hand their per-item function to
:func:`map_ordered`. The runner (params.yaml ``fanout.runner``) decides where it runs; results and
their order never depend on it, so stage outputs are identical whichever is chosen:

* ``process`` (default): a local ``ProcessPoolExecutor``, ``init(*init_args)`` as its initializer.
  The fastest on one machine, and it never imports Prefect (a plain ``dvc repro`` pays nothing).
* ``thread``: Prefect ``ThreadPoolTaskRunner`` in this process. Mostly useful for I/O-bound work
  (the per-file work here holds the GIL much of the time).
* ``dask``: prefect-dask ``DaskTaskRunner``: the scheduler at ``address`` (``tcp://host:8786``),
  or a temporary ``distributed.LocalCluster`` of ``workers`` single-threaded processes. Workers need
  this package installed and the stage's input/output paths on a shared filesystem; what ``init``
  receives (for ingest: the pseudonymisation key) travels to them, so use ``tls://`` outside a
  trusted network. ``init`` sets module globals once per worker process and call: give a shared
  cluster to one pipeline run at a time.
* ``inline``: in this process, no parallelism (also what ``workers == 1`` means).

With ``thread`` and ``dask`` the items are cut into chunks (a few per worker), each chunk one
Prefect task run of a small flow named ``medtl-<desc>``: thousands of task runs, one per file, would
cost more than the work. The flow reports to the configured ``PREFECT_API_URL``, or to an ephemeral
server that Prefect starts.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

RUNNERS = ("process", "thread", "dask", "inline")
MAX_AUTO_CHUNK = 256  # items per task at most when chunk is automatic: keeps progress and results flowing


@dataclass(frozen=True)
class FanoutParams:
    """params.yaml ``fanout`` section. The worker count is each stage's own ``workers``.

    Attributes:
        runner: ``process`` | ``thread`` | ``dask`` | ``inline`` (see the module docstring).
        address: Dask scheduler address for ``dask``; None starts a temporary local cluster. With
            an address, the cluster's size decides the parallelism (the stage's ``workers`` is not
            used).
        chunk: items per task (per ``ProcessPoolExecutor.map`` chunk for ``process``); 0 = automatic.
    """

    runner: str = "process"
    address: str | None = None
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"fanout.runner must be one of {list(RUNNERS)}, got {self.runner!r}")
        if not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"fanout.chunk must be an integer >= 0 (0 = automatic), got {self.chunk!r}")
        if self.address is not None and not (isinstance(self.address, str) and self.address.strip()):
            raise ValueError(f"fanout.address must be a scheduler address like 'tcp://host:8786' or null, "
                             f"got {self.address!r}")

    def is_inline(self, workers: int) -> bool:
        """Whether work with ``workers`` (0 = one per core) runs in this process, one item at a time."""
        if self.runner == "dask" and self.address:
            return False  # an existing cluster: its size decides
        return self.runner == "inline" or (workers or os.cpu_count() or 1) == 1


def map_ordered(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    init: Callable[..., None],
    init_args: tuple = (),
    params: FanoutParams | None = None,
    workers: int = 0,
    desc: str = "work",
    unit: str = "file",
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in input order, wherever ``params.runner`` runs them.

    ``init(*init_args)`` runs in every process that runs ``fn`` before its first item (it typically
    sets module globals that ``fn`` reads; with ``thread`` those are this process's globals, set once
    per call). ``fn``, ``init`` and ``init_args`` must be picklable (module-level functions) for
    ``process`` and ``dask``. An exception raised by ``fn`` propagates from the iteration.

    Args:
        fn: the per-item work.
        items: the inputs.
        init: per-process set-up.
        init_args: arguments of ``init``.
        params: where to run (default: ``process``).
        workers: processes or threads; 0 = one per CPU core; 1 = inline (except on a Dask address).
        desc: progress bar label and Prefect flow name suffix.
        unit: progress bar unit.
    """
    params = params or FanoutParams()
    items = list(items)
    if not items:
        return
    n_workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=None, mininterval=1.0)
    try:
        if params.is_inline(workers):
            init(*init_args)
            for item in items:
                yield fn(item)
                bar.update()
        elif params.runner == "process":
            chunk = params.chunk or max(1, min(64, len(items) // (n_workers * 8)))
            pool = ProcessPoolExecutor(n_workers, initializer=init, initargs=init_args)
            try:
                for result in pool.map(fn, items, chunksize=chunk):
                    yield result
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for results in _prefect_chunks(fn, items, init, init_args, params, n_workers, desc):
                yield from results
                bar.update(len(results))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# thread / dask: chunks as Prefect task runs


class _Chunk:
    """One task run's share of a call: ``fn`` over ``items`` after ``init``.

    A plain object on purpose: Prefect and Dask walk lists, tuples, dicts and dataclasses in task
    arguments looking for futures (slow for thousands of items, and Dask rebuilds tuples), never
    into an object like this one.
    """

    __slots__ = ("fn", "init", "init_args", "items", "start", "token")

    def __init__(self, fn: Callable, init: Callable, init_args: tuple, token: str, start: int, items: list):
        self.fn, self.init, self.init_args, self.items = fn, init, init_args, items
        self.token = token  # one per map_ordered call: init runs once per process and call
        self.start = start  # index of the first item

    def __dask_tokenize__(self) -> tuple:
        return ("medtl-fanout", self.token, self.start)  # unique; spares Dask hashing the items


_INIT_LOCK = threading.Lock()
_INIT_TOKEN: str | None = None


def _run_chunk(chunk: _Chunk, start: int) -> list:
    """One Prefect task run: ``init`` (once per process and call), then ``fn`` over the chunk's items.

    ``start`` (= ``chunk.start``) names the task run in the Prefect UI.
    """
    global _INIT_TOKEN
    with _INIT_LOCK:  # threads of one process share init's globals: set them once, before any fn
        if _INIT_TOKEN != chunk.token:
            chunk.init(*chunk.init_args)
            _INIT_TOKEN = chunk.token
    return [chunk.fn(item) for item in chunk.items]


def _chunk_size(params: FanoutParams, n_items: int, slots: int) -> int:
    return params.chunk or max(1, min(MAX_AUTO_CHUNK, math.ceil(n_items / (max(1, slots) * 4))))


def _prefect_chunks(fn: Callable, items: list, init: Callable, init_args: tuple, params: FanoutParams,
                    n_workers: int, desc: str) -> Iterator[list]:
    """Run chunks of ``items`` as task runs of a Prefect flow on the chosen task runner; yield each
    chunk's results, in order, as soon as it and those before it are done."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.context import FlowRunContext
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        temporary_settings,
    )

    if params.runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        task_runner: Any = ThreadPoolTaskRunner(max_workers=n_workers)
    else:
        from prefect_dask import DaskTaskRunner

        if params.address:
            task_runner = DaskTaskRunner(address=params.address)
        else:
            task_runner = DaskTaskRunner(
                cluster_class="distributed.LocalCluster",
                # one thread per process: the per-file work is CPU-bound Python
                cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True,
                                "dashboard_address": ":0"},
            )

    token = uuid.uuid4().hex
    chunk_task = task(_run_chunk, name=f"{desc}-chunk", task_run_name=f"{desc}-from-{{start}}",
                      cache_policy=NO_CACHE, persist_result=False)

    def fan_out() -> Iterator[list]:
        if params.runner == "dask":
            # the cluster's size, whether it was started here or found at the address
            slots = sum(FlowRunContext.get().task_runner.client.nthreads().values())
        else:
            slots = n_workers
        size = _chunk_size(params, len(items), slots)
        futures = [chunk_task.submit(_Chunk(fn, init, tuple(init_args), token, start, items[start:start + size]),
                                     start)
                   for start in range(0, len(items), size)]
        for future in futures:
            yield future.result()

    fan_out_flow = flow(fan_out, name=f"medtl-{desc}", task_runner=task_runner, persist_result=False,
                        validate_parameters=False, log_prints=False)
    api_url = PREFECT_API_URL.value()
    if not api_url and params.runner == "dask" and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        # No server configured: start the temporary one Prefect would start anyway, and name it in
        # the settings that travel with each task, else every Dask worker starts a server of its own.
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        server.start()
        api_url = server.api_url
    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
        yield from fan_out_flow()
