"""Tiny-task throughput of ``compute.map`` on 2 Local nodes against 2-worker process pools.

Every system runs the same no-op calls with two workers: Skyward as 2 Local
nodes x 1 slot, ``concurrent.futures.ProcessPoolExecutor(2)`` and
``loky.get_reusable_executor(2)``. Each is warmed up first (start-up is a
separate benchmark), then timed best-of-3, with ``chunksize=1`` and with a
chunk size that batches many calls per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager

import loky

import skyward as sky
from benchmarks.common import Row, best_of

WORKERS = 2
CHUNKSIZE = 64


def noop(x: int) -> int:
    """The task: as small as a task gets."""
    return x


@contextmanager
def _skyward() -> Iterator[Executor]:
    with sky.Compute(provider=sky.Local(), nodes=WORKERS, worker=sky.Worker(concurrency=1)) as c:
        yield c


@contextmanager
def _process_pool() -> Iterator[Executor]:
    with ProcessPoolExecutor(WORKERS) as pool:
        yield pool


@contextmanager
def _loky() -> Iterator[Executor]:
    executor = loky.get_reusable_executor(WORKERS)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True)


SYSTEMS: dict[str, Callable[[], AbstractContextManager[Executor]]] = {
    "skyward": _skyward,
    "ProcessPoolExecutor": _process_pool,
    "loky": _loky,
}


def _rate(executor: Executor, tasks: int, chunksize: int, repeat: int) -> float:
    items = range(tasks)

    def once() -> None:
        assert sum(executor.map(noop, items, chunksize=chunksize)) == sum(items)

    once()  # warm-up: workers started, function shipped
    return tasks / best_of(repeat, once)


def run(quick: bool) -> list[Row]:
    """Measure tasks per second of every system, with and without ``chunksize``."""
    tasks = 10_000 if quick else 50_000
    repeat = 3
    rates: dict[tuple[str, int], float] = {}
    for system, start in SYSTEMS.items():
        with start() as executor:
            for chunksize in (1, CHUNKSIZE):
                rates[system, chunksize] = _rate(executor, tasks, chunksize, repeat)
    rows = []
    for chunksize in (1, CHUNKSIZE):
        workload = f"throughput map {tasks} no-ops chunksize={chunksize}"
        ours = rates["skyward", chunksize]
        for peer in ("ProcessPoolExecutor", "loky"):
            rows.append(
                Row(
                    workload,
                    f"skyward {WORKERS} Local nodes",
                    "tasks/s",
                    ours,
                    "tasks/s",
                    peer=peer,
                    ratio=ours / rates[peer, chunksize],
                )
            )
        for peer in ("ProcessPoolExecutor", "loky"):
            rows.append(
                Row(workload, f"{peer}({WORKERS})", "tasks/s", rates[peer, chunksize], "tasks/s")
            )
    return rows
