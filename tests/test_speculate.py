"""Straggler re-execution (``Compute(speculate=True)``): a frozen node does not hold a call
hostage, and each task's result is delivered exactly once (issue 16)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import wait

import pytest

import skyward as sky

pytestmark = pytest.mark.timeout(120)


def square_slowly(i: int) -> int:
    time.sleep(0.1)
    return i * i


@pytest.mark.parametrize("speculate", [True, False], ids=["speculate", "without"])
def test_a_frozen_node_does_not_hold_the_call_and_results_come_once(
    speculate: bool, no_agents_left: None
) -> None:
    compute = sky.Compute(
        nodes=3, worker=sky.Worker(2), speculate=speculate, heartbeat_timeout=600.0
    ).start()
    frozen = compute.nodes[2].pid
    assert frozen is not None
    try:
        with compute.call() as call:
            os.kill(frozen, signal.SIGSTOP)
            futures = [call.submit(square_slowly, i) for i in range(100)]
        settled: Counter[int] = Counter()
        for i, future in enumerate(futures):
            future.add_done_callback(lambda f, i=i: settled.update([i]))
        # Generous: the healthy nodes need about 3 s; the frozen one never answers.
        _, pending = wait(futures, timeout=30)
        if not speculate:
            assert pending  # the frozen node holds its tasks: what speculation is for
            return
        assert not pending, f"{len(pending)} task(s) still held by the frozen node"
        assert [f.result() for f in futures] == [i * i for i in range(100)]
        assert compute.stats()["tasks"]["speculated"] >= 1
        os.kill(frozen, signal.SIGCONT)  # its late answers must not settle anything again
        assert sorted(compute.map(abs, range(-30, 0))) == list(range(1, 31))
        compute.stats(refresh=True)
        assert set(settled) == set(range(100)) and set(settled.values()) == {1}
        assert compute.stats()["tasks"]["completed"] == 100 + 30
    finally:
        os.kill(frozen, signal.SIGCONT)
        compute.shutdown(wait=False, cancel_futures=True)
