"""Client memory while streaming: ``Parallel(return_as="generator")`` over 10**6 tasks.

The results are consumed one by one and dropped, so a backend that streams keeps
the client's memory flat. Reported: the growth of the client's resident memory
(peak during the run minus before it), for Skyward (4 Local nodes) and loky.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psutil
from joblib import Parallel, delayed

import skyward as sky
from benchmarks.common import Row

NODES = 4


def square(x: int) -> int:
    return x * x


@contextmanager
def peak_rss() -> Iterator[Callable[[], int]]:
    """Sample this process's RSS every 10 ms; yield a getter of the peak growth in bytes."""
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0] - base
    finally:
        stop.set()
        thread.join()


def _stream(tasks: int, backend: str | None) -> tuple[int, float]:
    total = 0
    started = time.perf_counter()
    with peak_rss() as growth:
        for value in Parallel(n_jobs=-1, backend=backend, return_as="generator")(
            delayed(square)(i) for i in range(tasks)
        ):
            total += value
        grown = growth()
    assert total == sum(i * i for i in range(tasks))
    return grown, time.perf_counter() - started


def run(quick: bool) -> list[Row]:
    """Peak client memory growth for Skyward and loky over the same stream."""
    tasks = 100_000 if quick else 1_000_000
    with sky.Compute(nodes=NODES, plugins=[sky.plugins.joblib()]):
        _stream(1000, None)  # warm-up
        ours, our_time = _stream(tasks, None)
    _stream(1000, "loky")
    loky, loky_time = _stream(tasks, "loky")
    workload = f"return_as='generator' over {tasks} tasks"
    mib = 1024 * 1024
    return [
        Row(
            workload,
            f"skyward {NODES} Local nodes",
            "client RSS growth",
            ours / mib,
            "MiB",
            peer="loky",
            ratio=ours / max(loky, 1),
            goal="flat (a few MiB)",
            met=ours < 64 * mib,
            extra={"wall_s": round(our_time, 2)},
        ),
        Row(
            workload,
            "loky",
            "client RSS growth",
            loky / mib,
            "MiB",
            extra={"wall_s": round(loky_time, 2)},
        ),
    ]
