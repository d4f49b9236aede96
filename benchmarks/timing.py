"""Shared helper of the benchmark scripts."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Sequence


def timed_map(fn: Callable, items: Sequence, workers: int, chunksize: int = 16) -> float:
    """Seconds to apply ``fn`` to every item, inline for 1 worker or in a process pool."""
    start = time.perf_counter()
    if workers == 1:
        for item in items:
            fn(item)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(fn, items, chunksize=chunksize))
    return time.perf_counter() - start
