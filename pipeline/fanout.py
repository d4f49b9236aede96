"""Fan-out: a stage's per-file work over processes, threads or a Dask cluster, results in input order.

Ingest (scan, rewrite) and preprocess (fingerprint sample, tensors) hand their per-item function to
:func:`map_ordered`. The runner (params.yaml ``fanout.runner``) decides where it runs; results and
their order never depend on it, so stage outputs are identical whichever is chosen:

* ``process`` (default): a local ``ProcessPoolExecutor``, ``init(*init_args)`` in each worker
  before its first item. The fastest on one machine, and it never imports Prefect (a plain
  ``dvc repro`` pays nothing).
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

When a worker process dies
--------------------------
A decoder that segfaults on a hostile file, the OOM killer, ``os._exit``: the process running the
item is gone, with no Python exception to report. What happens then, per runner:

* ``process``: results already received are kept. The pool is replaced; the items that were running
  when a worker died (the culprit, and innocent items that other workers were running when the pool
  was torn down) are run again *alone*, one task each in a pool of one worker, so the one whose
  process dies is known; every other unfinished item (items of the same chunks done before the
  crash lost their results with it) is run again, in chunks, in a fresh pool. An item whose process
  dies again when run alone is handed to ``on_crash(item, reason)`` (in this process) and what it
  returns takes the item's place; without ``on_crash``, :class:`WorkerDied` (a
  ``BrokenProcessPool``) naming the item's index and repr is raised when the iteration reaches
  that item. Results still come in input order, each item's exactly once; ``fn`` may run more than
  once for an item that shared a chunk with a crash (its outputs must be written atomically, as the
  stages do). Workers that die outside any item (``init`` failing, say) three times in a row end the
  call with ``BrokenProcessPool``.
* ``dask``: Dask itself reruns a task whose worker died on another worker (the nanny restarts the
  dead one), up to ``distributed.scheduler.allowed-failures`` (default 3) times, then fails it with
  ``KilledWorker``. A chunk that fails so is run again one item per task, and an item whose task
  fails so too once more with no other item of its chunk beside it (Dask blames every task a dead
  worker held, queued ones too); an item that fails so then goes to ``on_crash``, or raises
  :class:`WorkerDied`, as above. A culprit costs 3 x (allowed-failures + 1) worker restarts.
  Limits: an innocent item held, queued, by workers that other chunks' culprits killed each time
  can still be blamed (unlikely: it takes allowed-failures + 1 deaths in a row); the Prefect task
  runs whose worker died stay ``Running`` in the Prefect UI; workers started without a nanny are
  not replaced, and if all of them die the call waits for the cluster to get workers back.
* ``inline`` and ``thread``: the item runs in this process, so its death is this process's:
  nothing here can survive it, and ``on_crash`` is never called. Use ``process`` for untrusted
  inputs.

Pool workers of ``process`` die with their parent (Linux): each asks the kernel for SIGKILL when
the process that started it exits (``PR_SET_PDEATHSIG``), and exits at once if that process is
already gone. With the ``forkserver`` start method that process is the fork server, which exits
with its parent. (Strictly, the kernel watches the thread that started the worker: the one that
iterates :func:`map_ordered`, which must not end before the iteration does.) Elsewhere nothing is
done: the workers of a killed parent may linger.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

RUNNERS = ("process", "thread", "dask", "inline")
MAX_AUTO_CHUNK = 256  # items per task at most when chunk is automatic: keeps progress and results flowing
DEATHS_OUTSIDE_ITEMS = 3  # pool breaks in a row with no item running (init failing?) before giving up


class WorkerDied(BrokenProcessPool):
    """A worker process died while running one item, and again when that item ran alone.

    Attributes:
        index: the item's position in the input.
        item: the item.
        reason: one line: how the process died.
    """

    def __init__(self, index: int, item: Any, reason: str):
        super().__init__(f"item {index} ({_short_repr(item)}): {reason}")
        self.index, self.item, self.reason = index, item, reason

    def __reduce__(self) -> tuple:
        return type(self), (self.index, self.item, self.reason)


def _short_repr(item: Any, limit: int = 120) -> str:
    try:
        text = " ".join(repr(item).split())
    except Exception:  # a broken __repr__ must not hide the crash
        text = f"<{type(item).__name__} object>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
MAX_AUTO_CHUNK = 256  # items per task at most when chunk is automatic: keeps progress and results flowing


@dataclass(frozen=True)
class FanoutParams:
    """params.yaml ``fanout`` section. The worker count is each stage's own ``workers``.

    Attributes:
        runner: ``process`` | ``thread`` | ``dask`` | ``inline`` (see the module docstring).
        address: Dask scheduler address for ``dask``; None starts a temporary local cluster. With
            an address, the cluster's size decides the parallelism (the stage's ``workers`` is not
            used).
        chunk: items per task (for ``process``: per pool task); 0 = automatic.
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
    on_crash: Callable[[T, str], R] | None = None,
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
        on_crash: for ``process`` and ``dask``: called, in this process, as ``on_crash(item, reason)``
            for an item whose worker process died even when it ran alone (``reason``: one line, e.g.
            ``worker process died (exit code -9, SIGKILL) while processing this item``); its return
            value is yielded in the item's place. None: :class:`WorkerDied` is raised instead, when
            the iteration reaches the item. See "When a worker process dies" in the module docstring.
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
            for result in _process_map(fn, items, init, tuple(init_args), n_workers, chunk, on_crash):
                yield result
                bar.update()
        else:
            for results in _prefect_chunks(fn, items, init, init_args, params, n_workers, desc, on_crash):
                yield from results
                bar.update(len(results))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------------
# process: a local pool that survives the death of its workers

# In a pool worker: the call's per-item state, shared with the parent (see _process_map).
_STATE: Any = None
_DONE = -1
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _pool_init(parent: int, direct_child: bool, state: Any, init: Callable, init_args: tuple) -> None:
    """A pool worker's initializer: die with the parent, keep the state array, then the caller's ``init``."""
    global _STATE
    _die_with_parent(parent, direct_child)
    _STATE = state
    init(*init_args)


def _die_with_parent(parent: int, direct_child: bool) -> None:
    """On Linux, have the kernel SIGKILL this process when the process that started it exits; exit
    now if ``parent`` is already gone (it may have died before the request was made)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc symbol: carry on without
        return
    if direct_child:  # fork, spawn: the parent started this process
        gone = os.getppid() != parent
    else:  # forkserver: the fork server started it (and exits with the parent); ask about the parent
        try:
            os.kill(parent, 0)
            gone = False
        except ProcessLookupError:
            gone = True
        except PermissionError:
            gone = False
    if gone:
        os._exit(1)


def _run_items(fn: Callable, indices: Sequence[int], items: list) -> list:
    """One pool task: ``fn`` over ``items``, marking in the shared state which one runs (by pid) and
    which are done, so that the parent knows what a dead worker was doing."""
    state, pid = _STATE, os.getpid()
    results = []
    for i, item in zip(indices, items):
        state[i] = pid
        results.append(fn(item))
        state[i] = _DONE
    return results


class _Raised:
    """In place of a chunk's results: ``fn`` raised (to be raised when the iteration gets there)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


class _Died:
    """In place of an item's result: its worker died while it ran alone."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        how = "exit code unknown"
    elif exitcode < 0:
        try:
            how = f"exit code {exitcode}, {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"exit code {exitcode}, signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    return f"worker process died ({how}) while processing this item"


def _process_map(fn: Callable, items: list, init: Callable, init_args: tuple, n_workers: int, chunk: int,
                 on_crash: Callable | None) -> Iterator:
    """``fn`` over ``items`` in local pool processes, results in input order, surviving dead workers.

    Rounds, each on a fresh pool: a bulk round runs the items still to do in chunks of ``chunk`` on
    ``n_workers``; when its pool breaks, the items that were running go to a solo round (one worker,
    one item per task: a death there is the item's own), the rest to the next bulk round. The
    workers mark in ``state`` (shared memory, one int per item) the item they run: 0 not started,
    a pid while running in that process, -1 done.
    """
    ctx = multiprocessing.get_context()
    n = len(items)
    state = ctx.RawArray(ctypes.c_int, n)
    initargs = (os.getpid(), ctx.get_start_method() != "forkserver", state, init, init_args)
    ready: dict[int, Any] = {}  # results (or _Raised/_Died) not yet yielded, by index
    next_i = 0  # index of the next result to yield
    todo: Sequence[int] = range(n)  # for the next bulk round, ascending
    suspects: list[int] = []  # for the next solo round, ascending
    fruitless = 0  # pool breaks in a row with no item running

    def drain() -> Iterator:
        nonlocal next_i
        while next_i in ready:
            value = ready.pop(next_i)
            if type(value) is _Raised:
                raise value.exc
            if type(value) is _Died:
                if on_crash is None:
                    raise WorkerDied(next_i, items[next_i], value.reason)
                value = on_crash(items[next_i], value.reason)
            yield value
            next_i += 1

    while todo or suspects:
        solo = bool(suspects)
        if solo:
            chunks: list[Sequence[int]] = [[i] for i in suspects]
        else:
            chunks = [todo[s:s + chunk] for s in range(0, len(todo), chunk)]
        pool = ProcessPoolExecutor(1 if solo else n_workers, mp_context=ctx, initializer=_pool_init,
                                   initargs=initargs)
        broken: BrokenProcessPool | None = None
        lost: list[int] = []
        progress = False
        try:
            futures = []
            for idx in chunks:
                try:
                    futures.append((idx, pool.submit(_run_items, fn, idx, items[idx.start:idx.stop]
                                                     if isinstance(idx, range) else [items[i] for i in idx])))
                except BrokenProcessPool as exc:  # a worker died already
                    broken = exc
                    break
            unsent = chunks[len(futures):]
            processes = getattr(pool, "_processes", None)  # pid -> Process: the dict outlives the pool
            if processes is None:
                processes = {}
            for k, (idx, future) in enumerate(futures):
                try:
                    results = future.result()
                except BaseException as exc:
                    if not (future.done() and future.exception() is exc):
                        raise  # not the task's: an interrupt here
                    if isinstance(exc, BrokenProcessPool) and getattr(pool, "_broken", True):
                        broken = exc  # (not one that fn raised)
                        break
                    ready[idx[0]] = _Raised(exc)  # raised when the iteration gets there (at once in a bulk round)
                    yield from drain()
                    continue
                progress = True
                if not ready and idx[0] == next_i and idx[-1] - next_i == len(idx) - 1:
                    yield from results  # the usual case: the next chunk in line
                    next_i += len(results)
                else:
                    ready.update(zip(idx, results))
                    yield from drain()
            else:
                k = len(futures)  # all received (a break, if any, came after the last one)
            if broken is not None:
                pool.shutdown(wait=True)  # broken: returns when its workers are gone, state settled
                for idx in unsent:
                    lost.extend(idx)
                for idx, future in futures[k:]:
                    exc = None if future.cancelled() else future.exception()
                    if future.cancelled() or isinstance(exc, BrokenProcessPool):
                        lost.extend(idx)
                    elif exc is not None:
                        ready[idx[0]] = _Raised(exc)
                    else:
                        ready.update(zip(idx, future.result()))
                        progress = True
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if broken is None:
            suspects, todo = ([], todo) if solo else (suspects, [])
            continue
        running = [i for i in lost if state[i] > 0]
        if solo:
            for i in running:  # the only one running in the only worker: its death is its own
                process = processes.get(state[i])
                ready[i] = _Died(_death(process.exitcode if process is not None else None))
            suspects = [i for i in lost if state[i] <= 0]
        else:
            suspects = running
            todo = [i for i in lost if state[i] <= 0]
        for i in lost:
            state[i] = 0
        if running or progress:
            fruitless = 0
        else:
            fruitless += 1
            if fruitless >= DEATHS_OUTSIDE_ITEMS:
                codes = sorted({p.exitcode for p in processes.values() if p.exitcode not in (None, -signal.SIGTERM)})
                raise BrokenProcessPool(f"worker processes died {fruitless} times in a row with no item running "
                                        f"(exit codes {codes}): does init fail in them?") from broken
        yield from drain()
    yield from drain()
    if next_i != n:  # every item is done, failed or dead by now
        raise RuntimeError(f"fan-out lost results: {next_i} of {n} yielded")


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


def _killed_worker(exc: BaseException) -> bool:
    """Whether ``exc`` says that Dask gave up on a task because the workers running it died."""
    distributed = sys.modules.get("distributed.scheduler")  # imported by then if Dask is in use
    return distributed is not None and isinstance(exc, distributed.KilledWorker)


def _prefect_chunks(fn: Callable, items: list, init: Callable, init_args: tuple, params: FanoutParams,
                    n_workers: int, desc: str, on_crash: Callable | None = None) -> Iterator[list]:
    """Run chunks of ``items`` as task runs of a Prefect flow on the chosen task runner; yield each
    chunk's results, in order, as soon as it and those before it are done. A chunk that Dask fails
    with ``KilledWorker`` runs again one item per task run (see the module docstring)."""
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
        chunks = [_Chunk(fn, init, tuple(init_args), token, start, items[start:start + size])
                  for start in range(0, len(items), size)]
        futures = [chunk_task.submit(chunk, chunk.start) for chunk in chunks]
        for chunk, future in zip(chunks, futures):
            try:
                yield future.result()
            except Exception as exc:
                if not _killed_worker(exc):
                    raise
                yield from one_by_one(chunk)

    def one_by_one(chunk: _Chunk) -> Iterator[list]:
        alone = [_Chunk(fn, init, chunk.init_args, token, chunk.start + j, [item])
                 for j, item in enumerate(chunk.items)]
        futures = [chunk_task.submit(one, one.start) for one in alone]
        outcomes: list[list | None] = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except Exception as exc:
                if not _killed_worker(exc):
                    raise
                outcomes.append(None)
        for one, outcome in zip(alone, outcomes):
            yield outcome if outcome is not None else on_its_own(one)

    def on_its_own(one: _Chunk) -> list:
        # Dask blames every task that a dead worker held, queued ones too: run the item again with
        # none of its chunk beside it, so that only its own deaths count
        try:
            return chunk_task.submit(one, one.start).result()
        except Exception as exc:
            if not _killed_worker(exc):
                raise
            reason = "Dask worker processes died each time they ran this item, also alone (KilledWorker)"
            if on_crash is None:
                raise WorkerDied(one.start, one.items[0], reason) from exc
            return [on_crash(one.items[0], reason)]

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
    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}), preserved_environ():
        yield from fan_out_flow()


@contextlib.contextmanager
def preserved_environ() -> Iterator[None]:
    """Put ``os.environ`` back as it was on the way out.

    A local Dask cluster's nannies run in this process and set distributed's ``pre-spawn-environ``
    here (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` = 1, ``MALLOC_TRIM_THRESHOLD_``)
    without removing it: everything started from this process later, a training run among them,
    would get one thread. Only variables this block changed are restored.
    """
    before = dict(os.environ)
    try:
        yield
    finally:
        after = dict(os.environ)
        for name in after.keys() - before.keys():
            os.environ.pop(name, None)
        for name, value in before.items():
            if after.get(name) != value:
                os.environ[name] = value
