"""Dispatch of tasks to node slots: queueing, retries after node loss, cancellation.

Free capacity is held as *tokens*, one per free slot, interleaved across
nodes: dispatch pops a token, a result pushes one back. Both are O(1), spread
work evenly and need no scan over nodes. Tokens of a dead node are dropped
lazily when popped.

Each node also has a few *prefetch* tokens (tasks queued on the agent behind
its busy slots, hiding the round trip of tiny tasks). They are used only while
more than one wave of work is queued: in the last wave, a task queued behind a
busy slot would wait there while another node's slot sits idle.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import Any

from skyward import wire
from skyward.node import Node
from skyward.wire import Status

log = logging.getLogger("skyward")


class NoWorkersError(RuntimeError):
    """Every node of the cluster is gone, so the remaining tasks cannot run."""


class WorkerDiedError(RuntimeError):
    """A task killed the worker that ran it on every attempt."""


class SkywardFuture(Future[Any]):
    """A :class:`concurrent.futures.Future` whose :meth:`cancel` also stops running tasks."""

    _record: TaskRecord | None = None
    _scheduler: Scheduler | None = None

    def cancel(self) -> bool:
        """Cancel the task: a queued one never starts, a running one is stopped on its node."""
        with self._condition:
            if self._state == FINISHED:
                return False
            if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            running = self._state == RUNNING
            self._state = CANCELLED
            self._condition.notify_all()
        if running and self._scheduler is not None and self._record is not None:
            self._scheduler.cancel_running(self._record)
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True


class TaskRecord:
    """One submitted task as the scheduler tracks it."""

    __slots__ = ("id", "payload", "keys", "future", "attempts", "node", "started", "name", "deaths")

    def __init__(
        self, task_id: int, payload: bytes, keys: tuple[str, ...], future: SkywardFuture, name: str
    ) -> None:
        self.id = task_id
        self.payload = payload
        self.keys = keys
        self.future = future
        self.attempts = 0
        self.node: Node | None = None
        self.started = False
        self.name = name
        self.deaths: list[str] = []


class Scheduler:
    """Queues tasks and keeps every live slot busy."""

    def __init__(self, max_retries: int = 2, prefetch: int | None = None) -> None:
        self.max_retries = max_retries
        self.prefetch = prefetch
        self.lock = threading.Lock()
        self.nodes: list[Node] = []
        self._queue: deque[TaskRecord] = deque()
        self._slots: deque[Node] = deque()
        self._extra: deque[Node] = deque()
        self._live = 0
        self._ids = itertools.count()
        self.closed = False
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self.cancelled = 0
        self.restarting = 0
        self.replace: Callable[[Node, str], bool] | None = None

    # --- nodes ----------------------------------------------------------------------------

    def add_nodes(self, nodes: Iterable[Node]) -> None:
        """Add started nodes and their slots."""
        nodes = list(nodes)
        with self.lock:
            self.nodes.extend(nodes)
            self._add_tokens(nodes)
        self._pump()

    def _add_tokens(self, nodes: list[Node]) -> None:
        width = max((n.concurrency for n in nodes), default=0)
        for i in range(width):  # one slot of every node, then the next slot of every node
            self._slots.extend(n for n in nodes if i < n.concurrency)
        for n in nodes:
            extra = self.prefetch if self.prefetch is not None else n.concurrency
            self._extra.extend([n] * extra)
            self._live += n.concurrency

    def _take(self) -> tuple[Node, deque[Node]] | None:
        """A live node with capacity, and the token deque it came from (lock held)."""
        for tokens in (self._slots, self._extra):
            if tokens is self._extra and len(self._queue) <= self._live:
                return None
            while tokens:
                node = tokens.popleft()
                if node.alive:
                    return node, tokens
        return None

    def _release(self, node: Node) -> None:
        """Give back the capacity of a finished task of ``node`` (lock held)."""
        if node.alive:
            busy = len(node.inflight) >= node.concurrency
            (self._extra if busy else self._slots).append(node)

    @property
    def live_nodes(self) -> list[Node]:
        """Nodes still connected."""
        return [n for n in self.nodes if n.alive]

    @property
    def live_slots(self) -> int:
        """Slots on the nodes still connected."""
        return sum(n.concurrency for n in self.nodes if n.alive)

    # --- submit / dispatch ----------------------------------------------------------------

    def submit(self, payload: bytes, keys: tuple[str, ...], name: str) -> SkywardFuture:
        """Queue a serialized task; return its future."""
        future = SkywardFuture()
        record = TaskRecord(next(self._ids), payload, keys, future, name)
        future._record = record
        future._scheduler = self
        with self.lock:
            if self.closed:
                raise RuntimeError(
                    "this Compute is shut down: submit tasks inside its `with` block"
                )
            if not self.restarting and not any(n.alive for n in self.nodes):
                raise NoWorkersError(_no_workers_message(self.nodes))
            self._queue.append(record)
            self.submitted += 1
        self._pump()
        return future

    def _pump(self) -> None:
        batches: dict[Node, list[TaskRecord]] = {}
        with self.lock:
            while self._queue:
                taken = self._take()
                if taken is None:
                    break
                node, tokens = taken
                record = self._queue.popleft()
                if not record.started:
                    if not record.future.set_running_or_notify_cancel():
                        tokens.appendleft(node)
                        self.cancelled += 1
                        continue
                    record.started = True
                elif record.future.cancelled():
                    tokens.appendleft(node)
                    continue
                record.node = node
                record.attempts += 1
                node.inflight[record.id] = record
                batches.setdefault(node, []).append(record)
        for node, records in batches.items():
            node.send_tasks(records)

    # --- results --------------------------------------------------------------------------

    def on_results(self, node: Node, results: list[tuple[int, int, bytes]]) -> None:
        """Called by a node's reader thread with the ``(task_id, status, payload)`` of a frame."""
        done: list[tuple[TaskRecord, Status, bytes]] = []
        with self.lock:
            for task_id, code, payload in results:
                record = node.inflight.pop(task_id, None)
                if record is None:
                    continue  # stale: the node was declared lost and the task rerun elsewhere
                self._release(node)
                node.tasks_done += 1
                status = Status(code)
                if status == Status.WORKER_DIED and self._retry(record, pickle.loads(payload)):
                    continue
                done.append((record, status, payload))
        for record, status, payload in done:
            self._resolve(record, status, payload, node)
        self._pump()

    def _retry(self, record: TaskRecord, why: str) -> bool:
        """Requeue ``record`` after a worker death, if it has attempts left (lock held)."""
        record.deaths.append(why)
        if record.future.cancelled() or record.attempts > self.max_retries:
            return False
        self._queue.appendleft(record)
        self.retried += 1
        return True

    def _resolve(self, record: TaskRecord, status: Status, payload: bytes, node: Node) -> None:
        future = record.future
        if future.done():
            return
        try:
            if status == Status.OK:
                try:
                    value = pickle.loads(payload)
                except Exception as exc:
                    raise TypeError(
                        f"the result of {record.name} from {node.name} cannot be unpickled on "
                        f"the client: {type(exc).__name__}: {exc}. Make the result's classes "
                        "importable on the client"
                    ) from exc
                try:
                    future.set_result(value)
                except InvalidStateError:
                    return  # cancelled while its result was on the way
                with self.lock:
                    self.completed += 1
                return
            if status == Status.ERROR:
                error = wire.loads_error(payload)
            elif status == Status.WORKER_DIED:
                causes = "; ".join(dict.fromkeys(record.deaths))
                error = WorkerDiedError(
                    f"task {record.name} killed its worker on each of its {record.attempts} "
                    f"attempt(s): {causes}. It was not retried further "
                    f"(max_retries={self.max_retries}); the rest of the cluster keeps running"
                )
            else:
                return
        except Exception as exc:  # noqa: BLE001
            error = exc
        with self.lock:
            self.failed += 1
        _fail(future, error)

    # --- node loss ------------------------------------------------------------------------

    def node_lost(self, node: Node, reason: str) -> None:
        """Mark ``node`` dead and requeue its in-flight tasks on the live nodes.

        ``replace`` (set by ``Compute``) may start a replacement in the background;
        while one is pending, queued work waits for it instead of failing.
        """
        failed: list[tuple[TaskRecord, BaseException]] = []
        with self.lock:
            if not node.alive:
                return
            node.alive = False
            self._live -= node.concurrency
            log.warning("node %s lost: %s", node.name, reason)
            records = sorted(node.inflight.values(), key=lambda r: r.id)
            node.inflight.clear()
            for record in reversed(records):
                retried = self._retry(record, f"{node.name} was lost ({reason})")
                if not retried and not record.future.cancelled():
                    failed.append((record, _lost_error(record, self.max_retries)))
        replacing = self.replace is not None and self.replace(node, reason)
        with self.lock:
            if replacing:
                self.restarting += 1
            failed.extend(self._fail_if_no_workers())
        self._fail_all(failed)
        self._pump()

    def node_replaced(self, old: Node, new: Node | None) -> None:
        """A replacement for ``old`` finished starting (``new``) or failed (``None``)."""
        with self.lock:
            self.restarting -= 1
            if new is not None and not self.closed:
                self.nodes[self.nodes.index(old)] = new
                self._add_tokens([new])
            failed = self._fail_if_no_workers()
        self._fail_all(failed)
        self._pump()

    def _fail_if_no_workers(self) -> list[tuple[TaskRecord, BaseException]]:
        """With no live node and none coming back, queued work fails (lock held)."""
        if any(n.alive for n in self.nodes) or self.restarting or self.closed:
            return []
        message = _no_workers_message(self.nodes)
        failed: list[tuple[TaskRecord, BaseException]] = []
        while self._queue:
            failed.append((self._queue.popleft(), NoWorkersError(message)))
        return failed

    def _fail_all(self, failed: list[tuple[TaskRecord, BaseException]]) -> None:
        for record, error in failed:
            if not record.future.done():
                with self.lock:
                    self.failed += 1
                _fail(record.future, error)

    # --- cancellation / shutdown ----------------------------------------------------------

    def cancel_running(self, record: TaskRecord) -> None:
        """A running task's future was cancelled: tell its node to stop it."""
        with self.lock:
            self.cancelled += 1
            node = record.node
        if node is not None and node.alive and record.id in node.inflight:
            node.cancel([record.id])

    def close(self, cancel: bool = True) -> None:
        """Refuse new tasks; cancel queued ones when ``cancel``."""
        with self.lock:
            self.closed = True
            queued = list(self._queue) if cancel else []
            if cancel:
                self._queue.clear()
            inflight = [r for n in self.nodes for r in n.inflight.values()] if cancel else []
        for record in queued + inflight:
            record.future.cancel()

    def idle(self) -> bool:
        """Whether no task is queued or running."""
        with self.lock:
            return not self._queue and not any(n.inflight for n in self.nodes if n.alive)

    def stats(self) -> dict[str, Any]:
        """Task counters."""
        with self.lock:
            return {
                "submitted": self.submitted,
                "completed": self.completed,
                "failed": self.failed,
                "retried": self.retried,
                "cancelled": self.cancelled,
                "queued": len(self._queue),
            }


def _fail(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(error)
        except Exception:  # noqa: BLE001 - the future was resolved concurrently
            pass


def _lost_error(record: TaskRecord, max_retries: int) -> BaseException:
    causes = "; ".join(dict.fromkeys(record.deaths))
    return WorkerDiedError(
        f"task {record.name} was running on a node that was lost on each of its "
        f"{record.attempts} attempt(s) ({causes}); giving up after "
        f"max_retries={max_retries}. If the task itself crashes its worker (os._exit, "
        "segfault, out of memory), fix the task; otherwise raise max_retries"
    )


def _no_workers_message(nodes: list[Node]) -> str:
    names = ", ".join(n.name for n in nodes) or "none"
    return (
        f"no live worker node is left (lost: {names}); the remaining tasks cannot run. "
        "Check the nodes' stderr above for the cause and start a new Compute"
    )


__all__ = ["Scheduler", "SkywardFuture", "NoWorkersError", "WorkerDiedError", "CancelledError"]
