"""Shared pieces of the benchmarks: timing, result rows, the markdown table.

Each benchmark module exposes ``run(quick: bool) -> list[Row]``; ``python -m
benchmarks`` runs them all (or those named on the command line), prints one
markdown table and writes ``benchmarks/results/<date>.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """One measurement: ``value`` of ``metric`` for ``system`` on ``workload``.

    ``ratio`` compares Skyward to ``peer`` (measured in the same run); ``goal``
    states the target in words (e.g. ">= 1.0x loky"), ``met`` whether it was met.
    """

    workload: str
    system: str
    metric: str
    value: float
    unit: str = ""
    peer: str | None = None
    ratio: float | None = None
    goal: str | None = None
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...`` then ``elapsed()`` gives seconds."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def best_of(repeat: int, fn: Callable[[], Any]) -> float:
    """Smallest wall time of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def efficiency_row(
    workload: str,
    system: str,
    efficiency: float,
    goal: float | None = 0.99,
    extra: dict[str, Any] | None = None,
) -> Row:
    """A row for ideal time / measured time, against the goal (a fraction) if any."""
    return Row(
        workload,
        system,
        "efficiency",
        efficiency * 100,
        "%",
        peer="ideal",
        ratio=efficiency,
        goal=f">= {goal:.0%}" if goal is not None else None,
        met=efficiency >= goal if goal is not None else None,
        extra=extra or {},
    )


@contextmanager
def dask_client(workers: int) -> Iterator[Any]:
    """A dask.distributed client on a process ``LocalCluster`` bound to loopback."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def markdown(rows: list[Row]) -> str:
    """Render rows as one markdown table."""
    lines = [
        "| workload | system | metric | value | vs peer | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(
            f"| {r.workload} | {r.system} | {r.metric} | {r.value:.4g} {r.unit} | "
            f"{r.peer or ''} | {ratio} | {r.goal or ''} | {met} |"
        )
    return "\n".join(lines)
