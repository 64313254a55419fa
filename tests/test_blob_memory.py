"""Issue 15: the client keeps a blob's bytes only while a task may need them, within a bound.

A blob's frame is held while a pending task needs it; beyond
``SKYWARD_CLIENT_BLOB_BYTES`` (or once no task needs it) it is dropped and pickled
again from the argument if a node asks for it; when the argument is gone too, the
task fails with an error that names the setting.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import psutil
import pytest

import skyward as sky
from skyward import wire
from skyward.agent import emit

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def _array(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(MiB // 4)  # 2 MiB of floats: no lz4


def _total(*arrays: np.ndarray) -> list[str]:
    """The arrays' bytes hashed (exact, unlike a float sum, whose rounding depends on the
    data's alignment)."""
    import hashlib

    assert all(a.flags.aligned for a in arrays)
    return [hashlib.sha256(a.tobytes()).hexdigest() for a in arrays]


def test_the_registry_stays_under_its_bound() -> None:
    bound = 5 * MiB
    registry = wire.BlobRegistry(max_bytes=bound)
    arrays = [_array(i) for i in range(10)]
    pinned = []
    for a in arrays:
        _, keys = wire.dumps_task(_total, (a,), {}, registry)
        pinned.append(keys)
        assert registry.held <= bound
    for keys, a in zip(
        pinned, arrays, strict=True
    ):  # every frame can still be produced, byte-exact
        (key,) = keys
        body = b"".join(bytes(p) for p in registry.frame(key))[wire.HEADER.size :]
        _, parts = wire.oob.split(body)
        assert [bytes(p) for p in parts] == [bytes(p) for p in wire.oob.dumps(a)]
        assert registry.held <= bound
    for keys in pinned:
        keys.release()
    assert registry.stats()["held_bytes"] == 0


def test_a_compute_within_its_bound_still_runs_every_task(
    monkeypatch: pytest.MonkeyPatch, no_agents_left: None
) -> None:
    bound = 5 * MiB
    monkeypatch.setenv(wire.BLOB_MEMORY_ENV, str(bound))
    arrays = [_array(i) for i in range(12)]
    with sky.Compute(nodes=2) as compute:
        futures = [compute.submit(_total, a) for a in arrays]
        assert compute._blobs.held <= bound
        assert [f.result(timeout=60) for f in futures] == [_total(a) for a in arrays]
        assert compute._blobs.stats()["rebuilt"] >= 1


def test_arguments_the_caller_dropped_are_not_kept(no_agents_left: None) -> None:
    with sky.Compute(nodes=1) as compute:
        refs = []
        for seed in range(6):
            a = _array(seed)
            refs.append(weakref.ref(a))
            assert compute.submit(_total, a).result(timeout=60) == _total(a)
            del a
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs), "the client kept dropped arguments"
        assert compute._blobs.stats() == {"held_bytes": 0, "blobs": 0, "rebuilt": 0}


def test_a_dropped_blob_is_pickled_again_on_need_blob(
    monkeypatch: pytest.MonkeyPatch, no_agents_left: None
) -> None:
    monkeypatch.setenv(wire.BLOB_MEMORY_ENV, "0")  # every frame dropped as soon as it can be
    a, b = _array(1), _array(2)
    # Each blob evicts the other from a 3 MiB cache, so the agent asks for one again.
    with sky.Compute(nodes=1, blob_cache_bytes=3 * MiB) as compute:
        assert compute.submit(_total, a, b).result(timeout=60) == _total(a, b)
        requests = compute.stats()["nodes"]["node-0"]["blob_requests"]
        assert requests >= 1
        # two frames rebuilt for the first send, one per request
        assert compute._blobs.stats()["rebuilt"] == 2 + requests


def _report_then_wait(a: np.ndarray) -> float:
    import os

    emit("started", os.getpid())
    time.sleep(60)
    return float(a[0])


def test_a_task_whose_blob_cannot_be_produced_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, no_agents_left: None
) -> None:
    monkeypatch.setenv(wire.BLOB_MEMORY_ENV, "0")
    started: list[int] = []
    ready = threading.Event()

    def on_started(pid: int) -> None:
        started.append(pid)
        ready.set()

    a = _array(3)
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=1), restarts=0) as compute:
        compute.on_message("started", on_started)
        future = compute.submit(_report_then_wait, a)
        assert ready.wait(60), "the task did not start"
        gone = weakref.ref(a)
        del a
        gc.collect()
        assert gone() is None
        psutil.Process(started[0]).kill()  # its node is lost: the task goes to the other
        with pytest.raises(sky.BlobUnavailableError, match=wire.BLOB_MEMORY_ENV):
            future.result(timeout=60)
        assert len(started) == 1  # it never ran again


def _block(_: int) -> int:
    return int(emit("hold", None))


def test_a_submitted_argument_is_read_when_submit_is_called(no_agents_left: None) -> None:
    """As ``Compute.submit`` promises: changed in place after the submit, before its task
    was sent, the argument still reaches the task as it was."""
    release = threading.Event()
    a = _array(4)
    before = _total(a)
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1)) as compute:
        compute.on_message("hold", lambda _: release.wait(60))
        blocker = compute.submit(_block, 0)  # holds the only slot: the next task waits
        pending = compute.submit(_total, a)
        assert not pending.running()
        a += 1
        changed = compute.submit(_total, a)
        release.set()
        assert blocker.result(timeout=60) == 1
        assert pending.result(timeout=60) == before
        assert changed.result(timeout=60) == _total(a) != before


def test_an_argument_changed_before_its_task_was_sent_fails_that_task_clearly(
    no_agents_left: None,
) -> None:
    """Within a call, large arguments are sent from their own memory: submitted again
    after an in-place change, the earlier task's frame is stale, and that task fails."""
    release = threading.Event()
    a = _array(4)
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1)) as compute:
        compute.on_message("hold", lambda _: release.wait(60))
        blocker = compute.submit(_block, 0)  # holds the only slot: the next task waits
        with compute.call() as call:
            pending = call.submit(_total, a)
        assert not pending.running()  # not sent yet: its frame is still views of `a`
        a += 1  # changed in place, then submitted again: the first frame is stale
        changed = compute.submit(_total, a)
        release.set()
        assert blocker.result(timeout=60) == 1
        with pytest.raises(sky.BlobUnavailableError, match=r"changed in place.*a\.copy\(\)"):
            pending.result(timeout=60)
        assert changed.result(timeout=60) == _total(a)


def test_a_cancelled_queued_task_lets_its_blobs_go(no_agents_left: None) -> None:
    release = threading.Event()
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1)) as compute:
        compute.on_message("hold", lambda _: release.wait(60))
        blocker = compute.submit(_block, 0)  # holds the only slot: the next task is queued
        queued = compute.submit(_total, _array(5))
        assert compute._blobs.stats()["held_bytes"] >= 2 * MiB
        assert queued.cancel()
        assert compute._blobs.stats()["held_bytes"] == 0  # while its future is still held
        release.set()
        assert blocker.result(timeout=60) == 1
