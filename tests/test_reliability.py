"""Node loss, retries, cancellation and teardown on every exit path (Local provider)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import agent_processes, wait_until

import skyward as sky

pytestmark = pytest.mark.timeout(120)


def slow_identity(i: int, delay: float = 0.02) -> tuple[int, int]:
    time.sleep(delay)
    return i, os.getpid()


def test_killed_agent_mid_run_every_result_exactly_once(no_agents_left: None) -> None:
    with sky.Compute(nodes=4, worker=sky.Worker(concurrency=2)) as compute:
        futures = [compute.submit(slow_identity, i) for i in range(400)]
        victim = compute.nodes[1]
        assert wait_until(lambda: victim.tasks_done >= 5, 30)
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        results = [f.result(timeout=60) for f in futures]
        stats = compute.stats()["tasks"]
    values = [value for value, _ in results]
    assert values == list(range(400))
    assert stats["completed"] == 400 and stats["failed"] == 0
    assert victim.pid not in {pid for _, pid in results[-50:]}


def test_frozen_node_is_detected_by_heartbeat_and_its_tasks_rerun(no_agents_left: None) -> None:
    timeout = 2.0
    with sky.Compute(
        nodes=3, worker=sky.Worker(concurrency=2), heartbeat_timeout=timeout, restarts=0
    ) as compute:
        frozen = compute.nodes[0]
        futures = [compute.submit(slow_identity, i, 0.05) for i in range(120)]
        assert wait_until(lambda: frozen.tasks_done >= 2, 30)
        os.kill(frozen.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            assert wait_until(lambda: not frozen.alive, timeout + 3)
            assert compute.total_slots == 4
            assert [f.result(timeout=60)[0] for f in futures] == list(range(120))
        finally:
            try:  # the client kills a node it declared lost; resume it if it is still there
                os.kill(frozen.pid, signal.SIGCONT)  # type: ignore[arg-type]
            except ProcessLookupError:
                pass


def test_all_nodes_lost_fails_pending_work_with_a_clear_error(no_agents_left: None) -> None:
    with sky.Compute(nodes=2, restarts=0) as compute:
        futures = [compute.submit(time.sleep, 0.5) for _ in range(6)]
        for node in compute.nodes:
            os.kill(node.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for future in futures:
            with pytest.raises((sky.NoWorkersError, sky.WorkerDiedError)):
                future.result(timeout=30)
        with pytest.raises(sky.NoWorkersError, match="no live worker node is left"):
            compute.submit(abs, 1)


def test_lost_node_is_restarted_and_slots_come_back(no_agents_left: None) -> None:
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2)) as compute:
        old_pid = compute.nodes[0].pid
        os.kill(old_pid, signal.SIGKILL)  # type: ignore[arg-type]
        # Compute publishes the new node a moment before the scheduler counts its slots
        # (a window the forked, fast restart can hit): wait for both.
        assert wait_until(
            lambda: (
                compute.nodes[0].alive
                and compute.nodes[0].pid != old_pid
                and compute.total_slots == 4
            ),
            30,
        )
        pids = {pid for _, pid in compute.map(slow_identity, range(40))}
        assert compute.nodes[0].pid in pids


def crash_worker() -> None:
    os._exit(7)


def test_task_that_kills_its_thread_worker_fails_after_retries(no_agents_left: None) -> None:
    with sky.Compute(nodes=2, max_retries=1) as compute:
        with pytest.raises(sky.WorkerDiedError, match="max_retries=1"):
            compute.submit(crash_worker).result(timeout=60)
        # the cluster survived: lost nodes were restarted
        assert wait_until(lambda: compute.total_slots == 2, 30)
        assert compute.submit(slow_identity, 5).result(timeout=30)[0] == 5


def test_task_calling_os_exit_in_process_executor(no_agents_left: None) -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2, executor="process")) as compute:
        with pytest.raises(sky.WorkerDiedError, match=r"os\._exit"):
            compute.submit(crash_worker).result(timeout=60)
        assert compute.nodes[0].alive
        assert compute.submit(slow_identity, 1).result(timeout=30)[0] == 1


def oom() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def test_worker_killed_like_the_oom_killer_says_so(no_agents_left: None) -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1, executor="process")) as compute:
        with pytest.raises(sky.WorkerDiedError, match="out of memory"):
            compute.submit(oom).result(timeout=60)


def touch_when(path: str, go: str | None) -> None:
    """Write this process's pid to ``<path>.pid``; once ``go`` exists (bounded wait), or at
    once without one, touch ``path``."""
    Path(f"{path}.pid").write_text(str(os.getpid()))
    if go is not None:
        wait_until(Path(go).exists, 60)
    Path(path).touch()


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_cancelled_tasks_do_not_run(executor: str, tmp_path: Path, no_agents_left: None) -> None:
    worker = sky.Worker(concurrency=1, executor=executor)  # type: ignore[arg-type]
    running_file, queued_file, go = tmp_path / "running", tmp_path / "queued", tmp_path / "go"
    with sky.Compute(nodes=1, worker=worker) as compute:
        running = compute.submit(touch_when, str(running_file), str(go))
        queued = compute.submit(touch_when, str(queued_file), None)  # touches at once if run
        tail = compute.submit(slow_identity, 9)  # more than a wave queued: `queued` is prefetched
        assert wait_until(lambda: running.running() and queued.running(), 10)  # both on the agent
        assert queued.cancel()
        if executor == "process":
            pid_file = tmp_path / "running.pid"
            assert wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", 30)
            pid = int(pid_file.read_text())
            assert running.cancel()  # the slot process is killed and replaced
            assert wait_until(lambda: not psutil.pid_exists(pid), 10)
        go.touch()
        assert compute.submit(slow_identity, 3).result(timeout=30)[0] == 3
        # `tail` follows `queued` on the node's one slot: once it ran, `queued` was dropped.
        assert tail.result(timeout=30)[0] == 9
        if executor == "thread":  # a running thread cannot be stopped: it runs to its end
            assert wait_until(running_file.exists, 10)
    assert not queued_file.exists()
    # With processes, the task's process died before `go` existed: it never touched it.
    assert running_file.exists() == (executor == "thread")


CLIENT = textwrap.dedent(
    """
    import sys, time
    import skyward as sky
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2)) as compute:
        futures = [compute.submit(time.sleep, 0.5) for _ in range(200)]
        print(" ".join(str(n.pid) for n in compute.nodes), flush=True)
        {wait}
    """
)


def _run_client(wait: str) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT.format(wait=wait)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2, proc.stderr.read() if proc.stderr else line
    return proc, pids


def _gone(pids: list[int]) -> bool:
    alive = {p.pid for p in agent_processes()}
    return not (set(pids) & alive)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_client_stops_every_agent(sig: int, no_agents_left: None) -> None:
    proc, pids = _run_client("[f.result() for f in futures]")
    try:
        proc.send_signal(sig)  # while its tasks run
        proc.wait(timeout=5)  # the client returns within 5 s
        assert wait_until(lambda: _gone(pids), 5)
        err = proc.stderr.read() if proc.stderr else ""
        if sig == signal.SIGINT:
            assert "KeyboardInterrupt" in err and proc.returncode == -signal.SIGINT, err
        else:  # SIGTERM unwinds the block as SystemExit(128 + SIGTERM)
            assert proc.returncode == 128 + signal.SIGTERM, err
    finally:
        proc.kill()
        proc.wait()


def test_interpreter_exit_without_with_block_stops_agents(no_agents_left: None) -> None:
    script = textwrap.dedent(
        """
        import skyward as sky
        compute = sky.Compute(nodes=2).__enter__()
        print(" ".join(str(n.pid) for n in compute.nodes), flush=True)
        assert compute.submit(abs, -1).result() == 1
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    pids = [int(p) for p in out.split()]
    assert wait_until(lambda: _gone(pids), 5)
