"""``joblib.Parallel`` through the Skyward backend, against loky, threading, dask and ray.

Tiny tasks: ``Parallel(n_jobs=-1)(delayed(noop)(i) for i in range(N))`` with
joblib's auto-batching (and with ``batch_size=1``) on each system's
``n_jobs=-1``: Skyward on 4 Local nodes x 1 slot, loky and joblib's threading
backend on this machine's cores, dask.distributed's joblib backend on a
4-worker ``LocalCluster`` bound to 127.0.0.1, ray's joblib backend on a local
4-CPU ray instance bound to 127.0.0.1 (skipped with a note when ray is not
installed). Each is warmed up, then timed best-of-3 (start-up is a separate
benchmark).

Sleep efficiency: 2000 x 0.25 s tasks on 4 nodes x 25 slots; efficiency is the
ideal time (tasks x duration / slots) divided by the measured wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from joblib import Parallel, delayed, parallel_config

import skyward as sky
from benchmarks.common import Row, best_of, dask_client, efficiency_row, stopwatch

NODES = 4
SLEEP_TASKS, SLEEP_SECONDS, SLEEP_SLOTS_PER_NODE = 2000, 0.25, 25


def noop(x: int) -> int:
    """The task: as small as a task gets."""
    return x


def nap(x: int) -> int:
    """The sleep-efficiency task."""
    time.sleep(SLEEP_SECONDS)
    return x


Rates = dict[str, float]  # batch size ("auto" or "1") -> tasks/s


def _rates(tasks: int, repeat: int, backend: str | None = None) -> Rates:
    def measure(batch_size: int | str, count: int) -> float:
        def once() -> None:
            out = Parallel(n_jobs=-1, backend=backend, batch_size=batch_size)(
                delayed(noop)(i) for i in range(count)
            )
            assert sum(out) == sum(range(count))

        once()  # warm-up: workers up, functions imported
        return count / best_of(repeat, once)

    # One round trip per task is slow everywhere: a tenth of the tasks is enough.
    return {"auto": measure("auto", tasks), "1": measure(1, max(tasks // 10, 100))}


def _skyward_rate(tasks: int, repeat: int) -> Rates:
    with sky.Compute(nodes=NODES, worker=sky.Worker(concurrency=1), plugins=[sky.plugins.joblib()]):
        return _rates(tasks, repeat)


def _loky_rate(tasks: int, repeat: int) -> Rates:
    from joblib.externals.loky import get_reusable_executor

    try:
        return _rates(tasks, repeat, backend="loky")
    finally:
        get_reusable_executor().shutdown(wait=True)


def _threading_rate(tasks: int, repeat: int) -> Rates:
    return _rates(tasks, repeat, backend="threading")


def _ray_rate(tasks: int, repeat: int) -> Rates:
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.util.joblib import register_ray

    register_ray()
    ray.init(
        num_cpus=NODES,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        with parallel_config(backend="ray"):
            return _rates(tasks, repeat)
    finally:
        ray.shutdown()


def _dask_rate(tasks: int, repeat: int) -> Rates:
    with dask_client(NODES), parallel_config(backend="dask"):
        return _rates(tasks, repeat)


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
    systems: dict[str, Callable[[int, int], Rates]] = {
        "skyward": _skyward_rate,
        "loky": _loky_rate,
        "threading": _threading_rate,
        "dask": _dask_rate,
        "ray": _ray_rate,
    }
    rates: dict[str, Rates] = {}
    for name, measure in systems.items():
        try:
            rates[name] = measure(tasks, repeat)
        except ImportError as exc:
            print(f"  {name} skipped: not installed ({exc})", flush=True)
    goals = {"loky": 1.0, "dask": 10.0}
    rows = []
    for batch in ("auto", "1"):
        count = tasks if batch == "auto" else max(tasks // 10, 100)
        workload = f"joblib Parallel(n_jobs=-1) {count} no-ops, batch_size={batch}"
        ours = rates["skyward"][batch]
        for peer, peer_rates in rates.items():
            if peer == "skyward":
                continue
            goal = goals.get(peer) if batch == "auto" else None
            rows.append(
                Row(
                    workload,
                    f"skyward {NODES} Local nodes",
                    "tasks/s",
                    ours,
                    "tasks/s",
                    peer=peer,
                    ratio=ours / peer_rates[batch],
                    goal=f">= {goal:g}x {peer}" if goal else None,
                    met=ours >= goal * peer_rates[batch] if goal else None,
                )
            )
        rows.extend(
            Row(workload, peer, "tasks/s", peer_rates[batch], "tasks/s")
            for peer, peer_rates in rates.items()
            if peer != "skyward"
        )
    rows.append(
        efficiency_row(
            f"joblib {SLEEP_TASKS} x {SLEEP_SECONDS}s sleeps, {NODES} nodes x "
            f"{SLEEP_SLOTS_PER_NODE} slots",
            "skyward",
            efficiency,
            extra={"wall_s": wall},
        )
    )
    return rows
