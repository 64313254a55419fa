"""The client's end of one agent: handshake, frame handlers, blobs already sent, counters."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from skyward import wire
from skyward.channel import Channel
from skyward.errors import BlobUnavailableError, NodeStartError
from skyward.waits import retries
from skyward.wire import Kind, Status

if TYPE_CHECKING:
    from skyward.io import FrameSink
    from skyward.scheduler import Scheduler
    from skyward.tasks import TaskRecord


class Node:
    """A connected agent with ``concurrency`` slots."""

    def __init__(self, index: int, channel: Channel, concurrency: int, blobs: wire.BlobRegistry):
        self.index = index
        self.name = channel.name
        self.channel = channel
        self.concurrency = concurrency
        self.blobs = blobs
        self.alive = False
        self.info: dict[str, Any] = {}
        self.inflight: dict[int, TaskRecord] = {}
        self.last_heard = time.monotonic()
        self.agent_stats: dict[str, int] = {}
        self.heartbeats = 0
        self.bytes_received = 0
        self.blobs_sent = 0
        self.blob_bytes_sent = 0
        self.blob_requests = 0
        self.tasks_done = 0
        self._sent_blobs: dict[str, int] = {}  # key -> its generation when sent
        self._send_lock = threading.Lock()
        self.outbox: FrameSink = channel.open_writer(self._broken)
        self._scheduler: Scheduler | None = None
        self._dispatch: wire.Dispatch | None = None
        self._receiving = threading.Lock()
        self._early: list[wire.Frame] = []
        self._hello: dict[str, Any] = {}
        self._hello_seen = threading.Event()
        self._end_reason: str | None = None
        self._stopped = False
        self.on_message: Callable[[Node, bytes], object] = lambda node, body: None

    def __repr__(self) -> str:
        state = "alive" if self.alive else "down"
        return f"<Node {self.name} {state} slots={self.concurrency} in_flight={len(self.inflight)}>"

    @property
    def bytes_sent(self) -> int:
        """Bytes written to this node's channel so far."""
        return self.outbox.sent

    @property
    def pid(self) -> int | None:
        """The agent's process id on its host."""
        pid = self.info.get("pid")
        return int(pid) if pid is not None else None

    # --- start ----------------------------------------------------------------------------

    def handshake(self, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send the client's HELLO and wait (bounded) for the agent's."""
        self.channel.attach(self._frame, self._ended)
        self.outbox.put(wire.encode_obj(Kind.HELLO, config))
        if not self._hello_seen.wait(timeout):
            self.channel.kill()
            raise NodeStartError(
                f"{self.name}: the agent did not answer within {timeout:.0f}s (step: handshake)"
            )
        if "error" in self._hello:
            raise NodeStartError(f"{self.name}: {self._hello['error']} (step: handshake)")
        self.info = self._hello["hello"]
        wire.check_compatible(wire.versions(), self.info, self.name)
        return self.info

    def start(self, scheduler: Scheduler) -> None:
        """Begin handing frames to ``scheduler`` (those that came since the handshake first)."""
        self.alive = True
        self.last_heard = time.monotonic()
        with self._receiving:
            self._scheduler = scheduler
            self._dispatch = self._table(scheduler)
            early, self._early = self._early, []
            for frame in early:
                self._handle(*frame)
            ended = self._end_reason
        if ended is not None:
            scheduler.node_lost(self, ended)

    # --- sending --------------------------------------------------------------------------

    def send_tasks(self, records: list[TaskRecord]) -> None:
        """Send tasks, each preceded by the blobs this node does not have yet.

        One list of buffers goes to the writer: a blob's large buffers are the
        argument's own memory, written as they are, never joined into one frame.
        A task whose blob the client can no longer produce fails instead.
        """
        buffers: list[bytes | memoryview] = []
        failed: list[tuple[TaskRecord, BaseException]] = []
        sent: list[TaskRecord] = []
        with self._send_lock:
            for record in records:
                try:
                    frames = self._missing_frames(record.keys)
                except BlobUnavailableError as exc:
                    failed.append((record, exc))
                    continue
                for key, generation, frame in frames:  # keys of one task are distinct
                    self._sent_blobs[key] = generation
                    buffers.extend(self._counted(key, frame))
                sent.append(record)
            if sent:
                buffers.append(
                    wire.encode_obj(Kind.TASK, [(r.id, tuple(r.keys), r.payload) for r in sent])
                )
            if buffers:
                self.outbox.put(buffers)
        self._fail(failed, tell_agent=False)

    def _missing_frames(self, keys: tuple[str, ...]) -> list[tuple[str, int, list[wire.Part]]]:
        """The blobs of ``keys`` this node lacks (or got in an older generation), framed."""
        missing = []
        for key in keys:
            generation = self.blobs.generation(key)
            if self._sent_blobs.get(key) != generation:
                missing.append((key, generation, self.blobs.frame(key)))
        return missing

    def _counted(self, key: str, frame: list[wire.Part]) -> list[wire.Part]:
        self.blobs_sent += 1
        self.blob_bytes_sent += sum(len(part) for part in frame)
        return frame

    def resend_blob(self, key: str) -> None:
        """The agent evicted a blob a task needs: send it again (or fail the tasks needing it)."""
        self.blob_requests += 1
        try:
            frame = self.blobs.frame(key)
        except BlobUnavailableError as exc:
            needing = [r for r in list(self.inflight.values()) if key in r.keys]
            self._fail([(record, exc) for record in needing], tell_agent=True)
            return
        with self._send_lock:
            self.outbox.put(self._counted(key, frame))

    def _fail(self, failed: list[tuple[TaskRecord, BaseException]], tell_agent: bool) -> None:
        """Settle tasks that cannot run, as if the agent had answered with the error; an agent
        holding them parked is told to drop them."""
        if not failed or self._scheduler is None:
            return
        if tell_agent:
            self.cancel([record.id for record, _ in failed])
        self._scheduler.on_results(
            self,
            [(r.id, int(Status.ERROR), wire.dumps_error(exc, "the client")) for r, exc in failed],
        )

    def cancel(self, task_ids: list[int]) -> None:
        """Ask the agent to cancel tasks (queued ones are dropped, running ones stopped)."""
        self.outbox.put(wire.encode_obj(Kind.CANCEL, task_ids))

    def heartbeat(self) -> None:
        """Tell the agent the client is alive."""
        self.outbox.put(wire.encode_obj(Kind.HEARTBEAT, None), urgent=True)

    # --- receiving (on the I/O loop: bookkeeping only, no user code) ----------------------

    def _table(self, scheduler: Scheduler) -> wire.Dispatch:
        def bye(body: bytes) -> object:  # the agent gives up, and says why
            self._end_reason = f"the agent stopped: {pickle.loads(body)}"
            return wire.STOP

        return wire.Dispatch(
            {
                Kind.RESULT: lambda body: scheduler.on_results(self, pickle.loads(body)),
                Kind.HEARTBEAT: self._heartbeat,
                Kind.NEED_BLOB: lambda body: self.resend_blob(pickle.loads(body)),
                Kind.BYE: bye,
                Kind.MESSAGE: lambda body: self.on_message(self, body),
            },
            on_frame=self._received,
        )

    def _frame(self, kind: Kind, body: bytes, size: int) -> None:
        if not self._hello_seen.is_set():
            self._received(size)
            if kind != Kind.HELLO:
                self._hello["error"] = f"the agent answered {kind.name} instead of HELLO"
            else:
                try:
                    self._hello["hello"] = pickle.loads(body)
                except Exception as exc:  # noqa: BLE001
                    self._hello["error"] = f"{type(exc).__name__}: {exc}"
            self._hello_seen.set()
            return
        with self._receiving:
            if self._scheduler is None:
                self._early.append((kind, body, size))
            else:
                self._handle(kind, body, size)

    def _handle(self, kind: Kind, body: bytes, size: int) -> None:
        if self._stopped:
            return
        assert self._dispatch is not None and self._scheduler is not None
        try:
            stop = self._dispatch.handle(kind, body, size)
        except Exception as exc:  # noqa: BLE001
            self._end_reason = f"reading from it failed: {type(exc).__name__}: {exc}"
            stop = True
        if stop:
            self._stopped = True
            self._scheduler.node_lost(self, self._end_reason or "the agent stopped")

    def _ended(self, reason: str) -> None:
        if not self._hello_seen.is_set():
            self._hello["error"] = (
                "the agent exited before saying hello (see its stderr above)"
                if reason.startswith("its channel closed")
                else reason
            )
            self._hello_seen.set()
        with self._receiving:
            if self._stopped:
                return
            self._stopped = True
            if self._end_reason is None:
                self._end_reason = reason
            scheduler = self._scheduler
        if scheduler is not None:
            scheduler.node_lost(self, self._end_reason)

    def _received(self, size: int) -> None:
        self.bytes_received += size
        self.last_heard = time.monotonic()

    def _heartbeat(self, body: bytes) -> None:
        self.agent_stats = pickle.loads(body)
        self.heartbeats += 1

    def _broken(self) -> None:
        if self._scheduler is not None:
            self._scheduler.node_lost(self, "writing to it failed (channel closed)")

    # --- stop -----------------------------------------------------------------------------

    def stop(self, timeout: float = 2.0, kill: bool = False) -> None:
        """Close the channel (the agent exits on EOF); kill it if asked or if it lingers."""
        self.alive = False
        if kill:
            self.channel.kill()
        else:
            self.outbox.put(wire.encode_obj(Kind.BYE, None))
            for _ in retries(time.monotonic() + 0.5, 0.005):
                if not self.outbox.pending:
                    break
        self.outbox.close()
        self.channel.close(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters for this node (see :meth:`skyward.Compute.stats`)."""
        return {
            "alive": self.alive,
            "slots": self.concurrency,
            "in_flight": len(self.inflight),
            "tasks_done": self.tasks_done,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "blobs_sent": self.blobs_sent,
            "blob_bytes_sent": self.blob_bytes_sent,
            "blob_requests": self.blob_requests,
            **self.agent_stats,
        }
