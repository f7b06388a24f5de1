"""Thread-parallel maps for numpy / scipy work that releases the GIL (filters, linear algebra)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one, else the CPU count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_map(fn: Callable, items: Iterable, workers: int | None = None) -> Iterator:
    """fn over items on ``workers`` threads (default ``usable_cores()``); results in the order of items."""
    items = list(items)
    workers = max(1, min(workers or usable_cores(), len(items)))
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, items)
