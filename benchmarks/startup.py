"""Start-up: from constructor to the first result, for 4 workers, against loky and dask;
and 100 Local nodes.

Skyward: ``Compute(nodes=4)`` on Local, entered, first ``submit`` answered
(goal DESIGN.md §9: ready in <= 1 s). Peers on the same 4 workers: a fresh
loky executor and a dask.distributed ``LocalCluster`` (processes, loopback).
Many nodes: ``Compute(nodes=100)`` on Local ready (issue 15: <= 3 s on 2 cores),
with the agents forked from the template (the default) and, for comparison, one
interpreter started per node (``Local(fork=False)``, full run only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import skyward as sky
from benchmarks.common import Row, dask_client

WORKERS = 4
MANY = 100


def _skyward(nodes: int = WORKERS, fork: bool | None = None) -> float:
    start = time.perf_counter()
    with sky.Compute(provider=sky.Local(fork=fork), nodes=nodes) as compute:
        ready = time.perf_counter() - start
        compute.submit(abs, -1).result()
    return ready


def many_nodes(quick: bool) -> list[Row]:
    """``Compute(nodes=100)`` on Local: ready, median of a few starts (goal <= 3 s)."""
    rows = []
    for fork in (None,) if quick else (None, False):
        repeat = 1 if quick or fork is False else 3
        ready = sorted(_skyward(MANY, fork) for _ in range(repeat))[repeat // 2]
        how = "one interpreter per node" if fork is False else "forked from a template"
        print(f"  {MANY} Local nodes ({how}) ready in {ready:.2f}s", flush=True)
        rows.append(
            Row(
                workload=f"start-up {MANY} Local nodes",
                system="skyward Local" + (" fork=False" if fork is False else ""),
                metric="ready",
                value=ready,
                unit="s",
                goal="<= 3 s" if fork is None else None,
                met=ready <= 3.0 if fork is None else None,
            )
        )
    return rows


def _loky() -> float:
    from loky import get_reusable_executor

    start = time.perf_counter()
    executor = get_reusable_executor(WORKERS, reuse=False)
    list(executor.map(abs, range(-WORKERS, 0)))  # loky starts its workers lazily
    ready = time.perf_counter() - start
    executor.shutdown(wait=True, kill_workers=True)
    return ready


def _dask() -> float:
    start = time.perf_counter()
    with dask_client(WORKERS) as client:
        client.submit(abs, -1).result()
        ready = time.perf_counter() - start
    return ready


def run(quick: bool) -> list[Row]:
    """Median of a few cold starts per system."""
    repeat = 2 if quick else 5
    systems: dict[str, Callable[[], float]] = {"loky": _loky, "dask": _dask}
    skyward = sorted(_skyward() for _ in range(repeat))[repeat // 2]
    rows = [
        Row(
            workload=f"start-up {WORKERS} workers",
            system="skyward Local",
            metric="ready",
            value=skyward,
            unit="s",
            goal="<= 1 s",
            met=skyward <= 1.0,
        )
    ]
    for name, measure in systems.items():
        try:
            peer = sorted(measure() for _ in range(repeat))[repeat // 2]
        except ImportError as exc:
            print(f"  {name} skipped: {exc}")
            continue
        rows.append(
            Row(
                workload=f"start-up {WORKERS} workers",
                system=name,
                metric="ready",
                value=peer,
                unit="s",
            )
        )
        rows.append(
            Row(
                workload=f"start-up {WORKERS} workers",
                system="skyward Local",
                metric="speed-up",
                value=peer / skyward,
                unit="x",
                peer=name,
                ratio=peer / skyward,
            )
        )
    return rows + many_nodes(quick)
