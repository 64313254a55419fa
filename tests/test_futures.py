"""Futures behave like the standard library's (issue 12, rows 5 and 6).

A cancel of a running task goes through the ``concurrent.futures`` state machine,
so ``wait``, ``as_completed`` and done-callbacks see it at once; results are
unpickled and done-callbacks run on one result thread, never on a node's I/O
thread, so a slow callback does not stall heartbeats.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, CancelledError, as_completed, wait
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import wait_until

import skyward as sky

pytestmark = pytest.mark.timeout(120)


def hold(folder: str, name: str) -> int:
    """Write this process's pid to ``<name>.pid``, wait (bounded) for ``release``, leave
    ``<name>.end``."""
    Path(folder, f"{name}.pid").write_text(str(os.getpid()))
    release = Path(folder, "release")
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(folder, f"{name}.end").touch()
    return os.getpid()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_of_a_running_task_wakes_wait_as_completed_and_callbacks(
    tmp_path: Path, no_agents_left: None
) -> None:
    worker = sky.Worker(concurrency=1, executor="process")
    with sky.Compute(nodes=1, worker=worker) as compute:
        running = compute.submit(hold, str(tmp_path), "running")
        # One more is prefetched onto the agent, the last two wait in the client.
        later = [compute.submit(hold, str(tmp_path), f"later-{i}") for i in range(3)]
        assert wait_until(lambda: (tmp_path / "running.pid").exists(), 30)
        pid = int((tmp_path / "running.pid").read_text())
        assert running.running() and not later[2].running()
        called = threading.Event()
        running.add_done_callback(lambda _: called.set())

        assert running.cancel()
        assert called.is_set()
        done, not_done = wait([running], timeout=20)
        assert done == {running} and not not_done
        assert next(as_completed([running], timeout=20)) is running
        assert running.cancelled() and running.done() and not running.running()
        with pytest.raises(CancelledError):
            running.result(timeout=0)
        assert running.cancel()  # cancelling again is a no-op that still says True

        # A task still queued in the client wakes its waiters at once too.
        assert later[2].cancel()
        assert wait([later[0], later[2]], timeout=20, return_when=FIRST_COMPLETED)[0] == {later[2]}

        # The running task was stopped on its node: its slot process is gone.
        assert wait_until(lambda: gone(pid), 20)
        (tmp_path / "release").touch()
        assert later[0].result(timeout=30) != pid and later[1].result(timeout=30) != pid
        assert not later[0].cancel()  # finished: too late to cancel
        assert compute.stats()["tasks"]["cancelled"] == 2
    # Its process died before the release existed, so it can never have ended.
    assert not (tmp_path / "running.end").exists()
    assert not (tmp_path / "later-2.pid").exists()


class Traced:
    """A result that notes which client thread unpickles it."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpickle_traced, (self.value,)


UNPICKLED_ON: list[int] = []


def _unpickle_traced(value: int) -> Traced:
    UNPICKLED_ON.append(threading.get_ident())
    return Traced(value)


def traced(value: int) -> Traced:
    return Traced(value)


def test_results_and_callbacks_run_on_one_result_thread_for_all_nodes(
    no_agents_left: None,
) -> None:
    UNPICKLED_ON.clear()
    called_on: list[int] = []
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2)) as compute:
        futures = [compute.submit(traced, i) for i in range(40)]
        for future in futures:
            future.add_done_callback(lambda _: called_on.append(threading.get_ident()))
        assert [f.result(timeout=30).value for f in futures] == list(range(40))
        pids = {n.pid for n in compute.nodes}
        assert len(pids) == 2 and all(n.tasks_done for n in compute.nodes)  # both nodes served
        assert wait_until(lambda: len(called_on) == 40, 10)
    # Callbacks of futures already done when added run on this thread, as usual.
    remote = {ident for ident in called_on if ident != threading.get_ident()}
    assert len(set(UNPICKLED_ON)) == 1, "results were unpickled on more than one thread"
    assert remote <= set(UNPICKLED_ON)
    assert threading.get_ident() not in UNPICKLED_ON


def test_slow_done_callback_does_not_get_a_healthy_node_declared_lost(
    tmp_path: Path, no_agents_left: None
) -> None:
    timeout = 1.0
    entered, release = threading.Event(), threading.Event()

    def slow_callback(_: object) -> None:  # e.g. writes a large file
        entered.set()
        release.wait(60)

    with sky.Compute(nodes=1, heartbeat_timeout=timeout, restarts=0) as compute:
        node = compute.nodes[0]
        future = compute.submit(hold, str(tmp_path), "task")
        future.add_done_callback(slow_callback)
        (tmp_path / "release").touch()
        try:
            assert entered.wait(30)
            blocked_at, heard = time.monotonic(), node.heartbeats
            # Heartbeats go on for three heartbeat timeouts while the callback blocks.
            assert wait_until(
                lambda: (
                    node.heartbeats >= heard + 10 and time.monotonic() - blocked_at > 3 * timeout
                ),
                30,
            ), "no heartbeat was handled while a done-callback ran"
            assert node.alive and compute.nodes[0] is node
        finally:
            release.set()
        assert compute.submit(abs, -2).result(timeout=30) == 2
        assert compute.stats()["tasks"]["retried"] == 0


def test_exit_waits_for_running_and_queued_tasks_and_their_callbacks(
    tmp_path: Path, no_agents_left: None
) -> None:
    called_on: list[str] = []
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1)) as compute:
        # One runs, one is prefetched onto the agent, two wait in the client.
        futures = [compute.submit(hold, str(tmp_path), f"task-{i}") for i in range(4)]
        for future in futures:
            future.add_done_callback(lambda _: called_on.append(threading.current_thread().name))
        assert wait_until(lambda: (tmp_path / "task-0.pid").exists(), 30)

        def release_once_exiting() -> None:  # the with block's exit is already waiting
            if wait_until(lambda: not compute.running, 30):
                (tmp_path / "release").touch()

        releaser = threading.Thread(target=release_once_exiting, daemon=True)
        releaser.start()
    releaser.join(30)
    assert [f.result(timeout=0) for f in futures] == [compute.nodes[0].pid] * 4
    assert all((tmp_path / f"task-{i}.end").exists() for i in range(4))
    assert called_on == ["skyward-results"] * 4, "exit returned before the done-callbacks ran"


def test_shutdown_called_from_a_done_callback_stops_the_cluster(
    tmp_path: Path, no_agents_left: None
) -> None:
    compute = sky.Compute(nodes=1)
    compute.__enter__()
    try:
        stopped = threading.Event()

        def stop(_: object) -> None:
            compute.shutdown()
            stopped.set()

        future = compute.submit(hold, str(tmp_path), "task")
        assert wait_until(lambda: (tmp_path / "task.pid").exists(), 30)
        future.add_done_callback(stop)  # still running: called on the result thread
        (tmp_path / "release").touch()
        assert stopped.wait(30), "shutdown() called from a done-callback did not return"
        assert not compute.running and future.result(timeout=0) > 0
    finally:
        compute.shutdown(wait=False)
