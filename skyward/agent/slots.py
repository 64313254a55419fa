"""``executor="process"``: one child agent per slot, fed over pipes with the same frames.

The parent never unpickles a task: it routes bytes, ships blobs to the child that
needs them, relays the child's task messages, and replaces a child that dies or
whose task is cancelled.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from skyward import wire
from skyward.wire import Kind, Status

if TYPE_CHECKING:
    from skyward.agent.serve import Agent, Task


class ProcessSlots:
    """``executor="process"``: one child agent per slot, fed over pipes."""

    def __init__(self, agent: Agent, concurrency: int) -> None:
        self.agent = agent
        self.lock = threading.Lock()
        self.queue: deque[tuple[Task, dict[str, Any]]] = deque()
        self.waiting: dict[str, list[Slot]] = {}
        self.slots = [Slot(self, i) for i in range(concurrency)]

    def submit(self, task: Task, blobs: dict[str, Any]) -> None:
        with self.lock:
            self.queue.append((task, blobs))
        self.pump()

    def pump(self) -> None:
        while True:
            with self.lock:
                slot = next((s for s in self.slots if s.task_id is None and s.alive), None)
                if slot is None or not self.queue:
                    return
                task, blobs = self.queue.popleft()
                slot.task_id = task[0]
            slot.send(task, blobs)

    def need_blob(self, slot: Slot, key: str) -> None:
        """A child evicted a blob it still needs: resend ours, or ask the client for it."""
        found, _ = self.agent.cache.lookup((key,))
        if found:
            slot.send_blobs(found, resend=True)
            return
        with self.lock:
            self.waiting.setdefault(key, []).append(slot)
        self.agent.request([key])

    def blob_arrived(self, key: str) -> None:
        with self.lock:
            slots = self.waiting.pop(key, [])
        if slots:
            found, _ = self.agent.cache.lookup((key,))
            for slot in slots:
                slot.send_blobs(found, resend=True)

    def cancel(self, task_id: int) -> None:
        with self.lock:
            queued = next((item for item in self.queue if item[0][0] == task_id), None)
            if queued is not None:
                self.queue.remove(queued)
            else:
                # Under the lock, so the slot cannot finish this task and take another
                # one before the kill lands: only the process running *this* task dies.
                running = next((s for s in self.slots if s.task_id == task_id), None)
                if running is not None:
                    running.cancelling = task_id
                    running.kill()
        if queued is not None:
            self.agent.finish(task_id, Status.CANCELLED, b"")

    def kill_all(self) -> None:
        for slot in self.slots:
            slot.alive = False
            slot.kill()


class Slot:
    """A child agent that runs one task at a time.

    ``task_id`` is None while the slot is free, the running task's id while busy,
    and -1 while its process is being replaced (out of dispatch).
    """

    def __init__(self, owner: ProcessSlots, index: int) -> None:
        self.owner = owner
        self.index = index
        self.write_lock = threading.Lock()
        self.alive = True
        self.task_id: int | None = None
        self.cancelling: int | None = None
        self.sent_at = 0.0
        self.spawn()

    def spawn(self) -> None:
        self.sent: set[str] = set()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skyward.agent", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin = self.proc.stdin
        config = dict(self.owner.agent.config, concurrency=1, executor="thread")
        config["node"] = f"{config.get('node', 'node')}/slot-{self.index}"
        try:
            self.write(wire.encode_obj(Kind.HELLO, config))
            frame = wire.read_frame(self.proc.stdout)
        except Exception:  # noqa: BLE001 - any failure to greet is a failed start
            frame = None
        if frame is None or frame[0] != Kind.HELLO:
            self.kill()
            code = self.proc.wait()
            raise RuntimeError(
                f"its process ended before saying hello (exit status {code}; see its stderr above)"
            )
        threading.Thread(
            target=self.read, args=(self.proc,), name=f"skyward-slot-{self.index}", daemon=True
        ).start()

    def write(self, data: bytes) -> None:
        with self.write_lock:
            self.stdin.write(data)
            self.stdin.flush()

    def send(self, task: Task, blobs: dict[str, Any]) -> None:
        self.sent_at = time.perf_counter()
        self.send_blobs(blobs, tail=wire.encode_obj(Kind.TASK, [task]))

    def send_blobs(self, blobs: dict[str, Any], tail: bytes = b"", resend: bool = False) -> None:
        frames = [
            wire.encode(Kind.BLOB, body, compress=False)
            for key, body in blobs.items()
            if resend or key not in self.sent
        ]
        self.sent.update(blobs)
        frames.append(tail)
        try:
            self.write(b"".join(frames))
        except OSError:
            pass  # the reader thread reports the dead child

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    def read(self, proc: subprocess.Popen[bytes]) -> None:
        agent = self.owner.agent
        assert proc.stdout is not None
        frames = wire.Dispatch(
            {
                Kind.NEED_BLOB: lambda body: self.owner.need_blob(self, pickle.loads(body)),
                Kind.MESSAGE: lambda body: self.relay(proc, body),
                Kind.RESULT: self.results,
            }
        )
        try:
            frames.run(proc.stdout)
        except Exception:  # noqa: BLE001 - killed mid-frame, or garbage: end it
            self.kill()
        code = proc.wait()
        if not self.alive:
            return
        with self.owner.lock:
            # -1 keeps the slot out of dispatch until its replacement has started.
            task_id, self.task_id = self.task_id, -1
            cancelled = task_id is not None and task_id == self.cancelling
            self.cancelling = None
        if task_id is not None and task_id >= 0:
            if cancelled:
                agent.finish(task_id, Status.CANCELLED, b"")
            else:
                agent.finish(task_id, Status.WORKER_DIED, pickle.dumps(_death(code)))
        try:
            self.spawn()
        except Exception as exc:  # noqa: BLE001 - reported to the client, which restarts the node
            self.alive = False
            agent.give_up(f"process-executor slot {self.index} could not be restarted: {exc}")
            return
        with self.owner.lock:
            self.task_id = None
        self.owner.pump()

    def results(self, body: bytes) -> None:
        with self.owner.lock:
            cancelled = self.cancelling
            # A slot being killed for a cancel stays out of dispatch until replaced.
            self.task_id = None if cancelled is None else -1
        busy = time.perf_counter() - self.sent_at
        for task_id, code, payload in pickle.loads(body):
            if task_id == cancelled:
                code, payload = Status.CANCELLED, b""
            self.owner.agent.finish(task_id, Status(code), payload, busy)
        self.owner.pump()

    def relay(self, proc: subprocess.Popen[bytes], body: bytes) -> None:
        """Forward a message of the child's task to the client, and the answer back."""
        child_id, topic, payload = pickle.loads(body)

        def reply(status: int, answer: bytes) -> None:
            if self.proc is proc:  # a replacement child numbers its messages anew
                try:
                    self.write(wire.encode_obj(Kind.MESSAGE, (child_id, status, answer)))
                except OSError:
                    pass  # the reader thread reports the dead child

        self.owner.agent.post(topic, payload, reply)


def _death(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
        cause = f"killed by signal {name}"
        if code == -signal.SIGKILL:
            cause += " (out of memory? the kernel's OOM killer sends SIGKILL)"
    else:
        cause = f"exited with code {code} (did the task call os._exit or sys.exit?)"
    return cause
