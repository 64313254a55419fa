"""Compute, scheduler, agent and Local provider with real subprocess agents."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import skyward as sky
from skyward import wire
from skyward.wire import Kind

pytestmark = pytest.mark.timeout(120)


def pid_of(_: object = None) -> int:
    return os.getpid()


def rendezvous(directory: str, expected: int, name: str, timeout: float = 20.0) -> int:
    """Mark this task as running and wait until ``expected`` tasks are running at once."""
    Path(directory, name).touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = len(os.listdir(directory))
        if count >= expected:
            return count
        time.sleep(0.01)
    return len(os.listdir(directory))


def test_tasks_run_in_agent_processes(no_agents_left: None) -> None:
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2)) as compute:
        pids = set(compute.map(pid_of, range(40)))
        agent_pids = {node.pid for node in compute.nodes}
    assert os.getpid() not in pids
    assert pids <= agent_pids
    assert len(agent_pids) == 2


def test_all_slots_run_concurrently(tmp_path: Path, no_agents_left: None) -> None:
    nodes, concurrency = 2, 3
    slots = nodes * concurrency
    with sky.Compute(nodes=nodes, worker=sky.Worker(concurrency=concurrency)) as compute:
        assert compute.total_slots == slots
        seen = list(
            compute.map(rendezvous, [str(tmp_path)] * slots, [slots] * slots,
                        [f"t{i}" for i in range(slots)])
        )
    # every task observed all `slots` tasks running at the same time
    assert seen == [slots] * slots


def test_process_executor_runs_each_slot_in_its_own_process(
    tmp_path: Path, no_agents_left: None
) -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=3, executor="process")) as compute:
        futures = [
            compute.submit(lambda i: (rendezvous(str(tmp_path), 3, f"t{i}"), os.getpid(),
                                      os.getppid()), i)
            for i in range(3)
        ]
        results = [f.result() for f in futures]
        agent_pid = compute.nodes[0].pid
    assert [r[0] for r in results] == [3, 3, 3]
    pids = {r[1] for r in results}
    assert len(pids) == 3 and agent_pid not in pids and os.getpid() not in pids
    assert {r[2] for r in results} == {agent_pid}


class CustomError(Exception):
    pass


def fail(message: str) -> None:
    raise CustomError(message)


def test_exception_keeps_type_and_remote_traceback(no_agents_left: None) -> None:
    with sky.Compute(nodes=1) as compute, pytest.raises(CustomError, match="boom") as info:
        compute.submit(fail, "boom").result()
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback (on node-0" in notes
    assert "in fail" in notes and "CustomError: boom" in notes


def test_unpicklable_task_gives_clear_error(no_agents_left: None) -> None:
    lock = threading.Lock()
    with sky.Compute(nodes=1) as compute:
        with pytest.raises(sky.UnpicklableTaskError, match="must be picklable"):
            compute.submit(lambda lk: lk, lock)
        assert compute.submit(pid_of).result() != os.getpid()  # the cluster still works


def test_large_payloads_are_lz4_compressed() -> None:
    body = b"\0" * (wire.COMPRESS_THRESHOLD * 4)
    frame = wire.encode(Kind.TASK, body)
    _, _, _, flags, length = wire.HEADER.unpack(frame[: wire.HEADER.size])
    assert flags & wire.FLAG_LZ4 and length < len(body) // 10
    small = wire.encode(Kind.TASK, b"x" * 100)
    assert wire.HEADER.unpack(small[: wire.HEADER.size])[3] == 0
    import io

    kind, decoded, size = wire.read_frame(io.BytesIO(frame))  # type: ignore[misc]
    assert kind == Kind.TASK and decoded == body and size == len(frame)


def test_large_argument_crosses_the_wire_compressed(no_agents_left: None) -> None:
    payload = bytes(8 * 1024 * 1024)
    with sky.Compute(nodes=1) as compute:
        assert compute.submit(len, payload).result() == len(payload)
        sent = compute.stats()["nodes"]["node-0"]["bytes_sent"]
    assert sent < len(payload) // 20


def test_agent_exits_when_stdin_closes() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyward.agent"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(wire.encode_obj(Kind.HELLO, {"concurrency": 1}))
        proc.stdin.flush()
        frame = wire.read_frame(proc.stdout)
        assert frame is not None and frame[0] == Kind.HELLO
        assert pickle.loads(frame[1])["pid"] == proc.pid
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_no_agent_survives_exit_after_exception(no_agents_left: None) -> None:
    with pytest.raises(RuntimeError, match="inside the block"):
        with sky.Compute(nodes=2) as compute:
            pids = [n.pid for n in compute.nodes]
            raise RuntimeError("inside the block")
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_queued_future_can_be_cancelled(tmp_path: Path, no_agents_left: None) -> None:
    marker = tmp_path / "ran"
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=1)) as compute:
        blocker = compute.submit(time.sleep, 1.0)
        # Fill the slot and the prefetch so the next task stays queued in the client.
        fillers = [compute.submit(time.sleep, 0.01) for _ in range(3)]
        late = compute.submit(marker.touch)
        assert late.cancel()
        blocker.result()
        for f in fillers:
            f.result()
        assert compute.submit(pid_of).result() == compute.nodes[0].pid  # the node still serves
    assert late.cancelled()
    assert not marker.exists()


def test_executor_api_map_and_shutdown(no_agents_left: None) -> None:
    compute = sky.Compute(nodes=2, worker=sky.Worker(concurrency=2))
    with compute:
        assert list(compute.map(pow, range(10), [2] * 10)) == [i**2 for i in range(10)]
        assert list(compute.map(abs, range(-50, 50), chunksize=7)) == [
            abs(i) for i in range(-50, 50)
        ]
    with pytest.raises(sky.ComputeStateError, match="shut down"):
        compute.submit(abs, 1)


def test_task_needing_more_blob_bytes_than_the_agent_cache_still_runs(
    no_agents_left: None,
) -> None:
    first, second = bytes([1]) * (2 << 20), bytes([2]) * (2 << 20)
    # Each blob evicts the other from a 3 MiB cache: the task must still get both.
    with sky.Compute(nodes=1, blob_cache_bytes=3 << 20) as compute:
        total = compute.submit(lambda x, y: x[0] + y[0] + len(x) + len(y), first, second)
        assert total.result(timeout=30) == 3 + (4 << 20)
        assert compute.stats()["nodes"]["node-0"]["blob_requests"] >= 1
