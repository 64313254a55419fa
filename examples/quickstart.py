"""Skyward in one minute: joblib.Parallel on a 2-node cluster of local worker processes.

Run it with ``nox -s demo`` (or ``python examples/quickstart.py`` once installed).
"""

import os
import time

from joblib import Parallel, delayed

import skyward as sky


def slow_square(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return x * x, os.getpid()


if __name__ == "__main__":
    with sky.Compute(
        provider=sky.Local(),
        nodes=2,
        worker=sky.Worker(concurrency=4),
        plugins=[sky.plugins.joblib()],
    ) as compute:
        slots = compute.total_slots
        started = time.perf_counter()
        results = Parallel(n_jobs=-1)(delayed(slow_square)(i) for i in range(64))
        elapsed = time.perf_counter() - started

    squares = [value for value, _ in results]
    worker_pids = sorted({pid for _, pid in results})
    assert squares == [i * i for i in range(64)]
    assert os.getpid() not in worker_pids
    print(f"64 tasks on {slots} slots in {elapsed:.2f}s")
    print(f"first squares: {squares[:8]}")
    print(f"computed in worker processes {worker_pids} (this client is pid {os.getpid()})")
