"""The process executor's slots: a cancel kills the process of *that* task, and a slot
that cannot be replaced gets its node declared lost with the reason."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

import skyward as sky
from skyward import wire
from skyward.agent import Agent, BlobCache, ProcessSlots
from skyward.wire import Kind, Status

pytestmark = pytest.mark.timeout(120)


class WatchedLock:
    """A lock that records when a thread has to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        self.contended.set()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class HarnessAgent(Agent):
    """An agent that, in this test process, records its exit instead of exiting."""

    exited: int | None = None

    def exit(self, code: int = 0) -> None:
        self.exited = code


class SlotHarness:
    """An agent's process slots driven in this process, with real child agents."""

    def __init__(self, concurrency: int) -> None:
        read_fd, write_fd = os.pipe()
        self._reader = os.fdopen(read_fd, "rb")
        self._writer = os.fdopen(write_fd, "wb")
        self.agent = HarnessAgent(io.BytesIO(), self._writer, child=False)
        self.agent.config = {"node": "harness", "env": {}}
        self.agent.cache = BlobCache(1 << 20, keep_bytes=True)
        self.slots = ProcessSlots(self.agent, concurrency)
        self.agent.slots = self.slots
        self.results: dict[int, Status] = {}
        self._arrived = threading.Condition()
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()

    def _collect(self) -> None:
        while (frame := wire.read_frame(self._reader)) is not None:
            if frame[0] == Kind.RESULT:
                with self._arrived:
                    for task_id, code, _ in pickle.loads(frame[1]):
                        self.results[task_id] = Status(code)
                    self._arrived.notify_all()

    def start(self, task_id: int, script: str) -> None:
        """Run a shell script as task ``task_id`` (a stdlib function: no blobs involved)."""
        argv = ["sh", "-c", script]
        payload, keys = wire.dumps_task(subprocess.call, (argv,), {}, wire.BlobRegistry())
        self.agent.accept((task_id, keys, payload))

    def result(self, task_id: int, timeout: float = 30) -> Status:
        with self._arrived:
            assert self._arrived.wait_for(lambda: task_id in self.results, timeout)
            return self.results[task_id]

    def close(self) -> None:
        self.slots.kill_all()
        self.agent.outbox.close()
        self._writer.close()  # the collector sees the end of the stream
        self._collector.join(5)
        self._reader.close()


@pytest.fixture
def harness() -> Iterator[SlotHarness]:
    harness = SlotHarness(concurrency=1)
    try:
        yield harness
    finally:
        harness.close()


def test_cancel_kills_the_process_of_that_task_not_the_next_one(
    harness: SlotHarness, tmp_path: Path
) -> None:
    lock = WatchedLock()
    harness.slots.lock = lock  # type: ignore[assignment]
    go, go_on = tmp_path / "go", tmp_path / "go-on"
    harness.start(1, f"touch {tmp_path}/started; while [ ! -e {go} ]; do sleep 0.01; done")
    # Queued behind task 1 on the only slot.
    harness.start(2, f"while [ ! -e {go_on} ]; do sleep 0.01; done")
    assert wait_until(lambda: (tmp_path / "started").exists(), 30)
    slot = harness.slots.slots[0]
    kill = slot.kill

    def kill_as_the_task_finishes() -> None:
        # Task 1 ends just as its cancel arrives: by the time the kill lands, the slot
        # has read its result and, unless the cancel holds it, taken task 2.
        go.touch()
        assert wait_until(lambda: slot.task_id == 2 or lock.contended.is_set(), 30)
        kill()

    slot.kill = kill_as_the_task_finishes  # type: ignore[method-assign]
    try:
        harness.agent.cancel(1)
    finally:
        slot.kill = kill  # type: ignore[method-assign]
    go_on.touch()
    assert harness.result(2) == Status.OK  # not WORKER_DIED: its process was not killed
    assert harness.result(1) == Status.CANCELLED
    assert harness.agent.exited is None


def exit_slot_and_break_respawn(folder: str) -> None:
    """Make new Python processes on this node fail at start-up, then end this slot."""
    Path(folder, "sitecustomize.py").write_text("import os\nos._exit(5)\n")
    os._exit(1)


def test_slot_that_cannot_be_replaced_gets_its_node_declared_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, no_agents_left: None
) -> None:
    # The slots' processes see `tmp_path` first on their path (Image.env reaches the agent,
    # which starts them), so the task can make their replacement fail.
    path = os.pathsep.join([str(tmp_path), *(p for p in sys.path if p)])
    image = sky.Image(env={"PYTHONPATH": path})
    worker = sky.Worker(concurrency=1, executor="process")
    caplog.set_level(logging.WARNING, logger="skyward")
    with sky.Compute(nodes=1, worker=worker, image=image, max_retries=0, restarts=0) as compute:
        node = compute.nodes[0]
        failed = compute.submit(exit_slot_and_break_respawn, str(tmp_path))
        with pytest.raises(sky.WorkerDiedError, match="exited with code 1"):
            failed.result(timeout=30)
        assert wait_until(lambda: not node.alive, 30), "the node kept running without its slot"
        with pytest.raises(sky.NoWorkersError):
            compute.submit(abs, 1)
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1, lost
    assert "slot 0 could not be restarted" in lost[0] and "exit status 5" in lost[0]
