"""``joblib.Parallel`` through the Skyward backend, against loky and dask's joblib backend.

Tiny tasks: ``Parallel(n_jobs=-1)(delayed(noop)(i) for i in range(N))`` with
joblib's auto-batching on each system's ``n_jobs=-1``: Skyward on 4 Local nodes
x 1 slot, loky on this machine's cores, dask.distributed's joblib backend on a
4-worker ``LocalCluster`` bound to 127.0.0.1. Each is warmed up, then timed
best-of-3 (start-up is a separate benchmark).

Sleep efficiency: 2000 x 0.25 s tasks on 4 nodes x 25 slots; efficiency is the
ideal time (tasks x duration / slots) divided by the measured wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from joblib import Parallel, delayed, parallel_config

import skyward as sky
from benchmarks.common import Row, best_of, stopwatch

NODES = 4
SLEEP_TASKS, SLEEP_SECONDS, SLEEP_SLOTS_PER_NODE = 2000, 0.25, 25


def noop(x: int) -> int:
    """The task: as small as a task gets."""
    return x


def nap(x: int) -> int:
    """The sleep-efficiency task."""
    time.sleep(SLEEP_SECONDS)
    return x


def _rate(tasks: int, repeat: int, backend: str | None = None) -> float:
    expected = sum(range(tasks))

    def once() -> None:
        out = Parallel(n_jobs=-1, backend=backend)(delayed(noop)(i) for i in range(tasks))
        assert sum(out) == expected

    once()  # warm-up: workers up, functions imported
    return tasks / best_of(repeat, once)


def _skyward_rate(tasks: int, repeat: int) -> float:
    with sky.Compute(nodes=NODES, worker=sky.Worker(concurrency=1), plugins=[sky.plugins.joblib()]):
        return _rate(tasks, repeat)


def _loky_rate(tasks: int, repeat: int) -> float:
    from joblib.externals.loky import get_reusable_executor

    try:
        return _rate(tasks, repeat, backend="loky")
    finally:
        get_reusable_executor().shutdown(wait=True)


def _dask_rate(tasks: int, repeat: int) -> float:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=NODES,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster),
        parallel_config(backend="dask"),
    ):
        return _rate(tasks, repeat)


def _sleep_efficiency(tasks: int) -> tuple[float, float]:
    slots = NODES * SLEEP_SLOTS_PER_NODE
    with sky.Compute(
        nodes=NODES,
        worker=sky.Worker(concurrency=SLEEP_SLOTS_PER_NODE),
        plugins=[sky.plugins.joblib()],
    ):
        Parallel(n_jobs=-1)(delayed(noop)(i) for i in range(slots))  # warm-up
        with stopwatch() as elapsed:
            out = Parallel(n_jobs=-1)(delayed(nap)(i) for i in range(tasks))
        assert out == list(range(tasks))
    ideal = tasks * SLEEP_SECONDS / slots
    return ideal / elapsed(), elapsed()


def run(quick: bool) -> list[Row]:
    """Sleep efficiency, then tiny-task rate against loky and dask.

    Sleep efficiency runs first: peers' leftover threads (dask's event loop) cost it
    several percent on a 2-core machine.
    """
    efficiency, wall = _sleep_efficiency(SLEEP_TASKS)
    tasks = 20_000 if quick else 100_000
    repeat = 3
    systems: dict[str, Callable[[int, int], float]] = {
        "skyward": _skyward_rate,
        "loky": _loky_rate,
        "dask": _dask_rate,
    }
    rates = {name: measure(tasks, repeat) for name, measure in systems.items()}
    workload = f"joblib Parallel(n_jobs=-1) {tasks} no-ops, auto batching"
    ours = rates["skyward"]
    rows = [
        Row(
            workload,
            f"skyward {NODES} Local nodes",
            "tasks/s",
            ours,
            "tasks/s",
            peer="loky",
            ratio=ours / rates["loky"],
            goal=">= 1.0x loky",
            met=ours >= rates["loky"],
        ),
        Row(
            workload,
            f"skyward {NODES} Local nodes",
            "tasks/s",
            ours,
            "tasks/s",
            peer=f"dask LocalCluster({NODES})",
            ratio=ours / rates["dask"],
            goal=">= 10x dask",
            met=ours >= 10 * rates["dask"],
        ),
        Row(workload, "loky (n_jobs=-1)", "tasks/s", rates["loky"], "tasks/s"),
        Row(
            workload,
            f"dask LocalCluster({NODES}) joblib backend",
            "tasks/s",
            rates["dask"],
            "tasks/s",
        ),
    ]
    rows.append(
        Row(
            f"joblib {SLEEP_TASKS} x {SLEEP_SECONDS}s sleeps, {NODES} nodes x "
            f"{SLEEP_SLOTS_PER_NODE} slots",
            "skyward",
            "efficiency",
            efficiency * 100,
            "%",
            peer="ideal",
            ratio=efficiency,
            goal=">= 99%",
            met=efficiency >= 0.99,
            extra={"wall_s": wall},
        )
    )
    return rows
