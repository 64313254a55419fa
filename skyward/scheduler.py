"""Dispatch of tasks to node slots: queueing, retries after node loss, cancellation.

Free capacity is held as slot and prefetch *tokens* (:mod:`skyward.tokens`):
dispatch pops one, a result pushes one back, both in O(1).

With ``speculate``, a straggler (a task running much longer than the median of
its group, while nothing is queued and a slot is idle) is started once more on
another node; the first copy to answer settles the future and the other is
cancelled and forgotten.

Tasks given a node are written one frame per node for all the tasks given it
since the last write (:meth:`Scheduler._flush`). Futures are settled on the
:class:`~skyward.tasks.ResultThread`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from typing import Any

from skyward import io as skyio
from skyward.errors import NoWorkersError
from skyward.node import Node
from skyward.stragglers import Stragglers
from skyward.tasks import (
    ResultThread,
    SkywardFuture,
    TaskCounts,
    TaskRecord,
    lost_error,
    no_workers_message,
    settle,
    settle_future,
)
from skyward.tokens import Tokens
from skyward.wire import Status

log = logging.getLogger("skyward")


class Scheduler:
    """Queues tasks and keeps every live slot busy."""

    def __init__(
        self, max_retries: int = 2, prefetch: int | None = None, speculate: bool = False
    ) -> None:
        self.max_retries = max_retries
        self.speculate = speculate
        self._stragglers = Stragglers()
        # Losing copies of speculated tasks still on their node: task id -> node.
        self._abandoned: dict[int, Node] = {}
        self.lock = threading.Lock()
        self.nodes: list[Node] = []
        self._queue: deque[TaskRecord] = deque()
        self._tokens = Tokens(prefetch)
        self._ids = itertools.count()
        # Tasks given a node but not yet written to it (see _flush).
        self._unsent: dict[Node, list[TaskRecord]] = {}
        self._unsent_count = 0
        self._flush_due = False
        self.closed = False
        self.counts = TaskCounts()
        self.restarting = 0
        # Notified whenever the scheduler may have become idle (see wait_idle).
        self._changed = threading.Condition(self.lock)
        self.replace: Callable[[Node, str], bool] | None = None
        # Jobs for the result thread; each returns (completed, failed) for the counters.
        self._undelivered = 0  # jobs handed to the result thread and not done yet
        self._results = ResultThread(self._delivered)

    # --- nodes ----------------------------------------------------------------------------

    def add_nodes(self, nodes: Iterable[Node], starts_ended: int = 0) -> None:
        """Add started nodes and their slots; ``starts_ended`` of the starts announced with
        :meth:`expect` are over (these nodes, or starts given up)."""
        nodes = list(nodes)
        with self.lock:
            self.restarting -= starts_ended
            self.nodes.extend(nodes)
            self._tokens.add(nodes)
            failed = self._fail_if_no_workers()
            self._changed.notify_all()
        self._fail_later(failed)
        self._pump()

    def expect(self, count: int) -> None:
        """``count`` nodes are starting: until :meth:`add_nodes` says their starts are
        over, queued work waits for them instead of failing for want of a live node."""
        with self.lock:
            self.restarting += count

    @property
    def live_nodes(self) -> list[Node]:
        """Nodes still connected."""
        return [n for n in self.nodes if n.alive]

    @property
    def live_slots(self) -> int:
        """Slots on the nodes still connected (a node being reclaimed no longer counts)."""
        return sum(n.concurrency for n in self.nodes if self._tokens.takes_work(n))

    def drain(self, node: Node) -> None:
        """Send ``node`` no more work (its spot instance is being reclaimed); the tasks it
        runs go on until it is declared lost, which reruns what is left elsewhere."""
        with self.lock:
            if not self._tokens.drain(node):
                return
            self._changed.notify_all()
        self._pump()

    # --- submit / dispatch ----------------------------------------------------------------

    def submit(
        self, payload: bytes, keys: tuple[str, ...], name: str, group: object = None
    ) -> SkywardFuture:
        """Queue a serialized task; return its future. ``group`` names the tasks whose run
        times a straggler is compared with (default: the function's name)."""
        future = SkywardFuture()
        record = TaskRecord(
            next(self._ids), payload, keys, future, name, name if group is None else group
        )
        future._record = record
        future._scheduler = self
        with self.lock:
            if self.closed:
                raise RuntimeError(
                    "this Compute is shut down: submit tasks inside its `with` block"
                )
            if not self.restarting and not any(n.alive for n in self.nodes):
                raise NoWorkersError(no_workers_message(self.nodes))
            self._queue.append(record)
            self.counts.submitted += 1
        self._pump()
        return future

    def _pump(self) -> None:
        with self.lock:
            while self._queue:
                taken = self._tokens.take(len(self._queue))
                if taken is None:
                    break
                node, tokens = taken
                record = self._queue.popleft()
                if record.future.done():  # cancelled while it waited
                    tokens.appendleft(node)
                    self._changed.notify_all()
                    continue
                record.node = node
                record.attempts += 1
                record.started = time.monotonic()
                node.inflight[record.id] = record
                self._unsent.setdefault(node, []).append(record)
                self._unsent_count += 1
            if not self._unsent:
                return
            # A caller submitting in a loop holds the GIL, and the loop's thread, which
            # needs it back after each write, would then write a node per switch
            # interval (5 ms): the caller writes each batch of a few tasks per node itself.
            now = not skyio.loop().on_loop and self._unsent_count >= max(16, 4 * len(self.nodes))
            if not now:
                if self._flush_due:
                    return
                self._flush_due = True
        if now:
            self._flush()
        else:  # soon, on the loop: with every task given a node until then
            skyio.loop().call(self._flush)

    def _flush(self) -> None:
        """Write the tasks given a node since the last flush, one frame per node.

        A task cancelled meanwhile is not sent: its slot is given back instead.
        """
        batches: dict[Node, list[TaskRecord]] = {}
        with self.lock:
            self._flush_due = False
            unsent, self._unsent, self._unsent_count = self._unsent, {}, 0
            for node, records in unsent.items():
                for record in records:
                    if node.inflight.get(record.id) is not record:
                        continue  # the node was lost: the task went back to the queue
                    if record.future.done():
                        del node.inflight[record.id]
                        self._tokens.release(node)
                        self._changed.notify_all()
                        continue
                    record.sent = True
                    batches.setdefault(node, []).append(record)
        for node, records in batches.items():
            node.send_tasks(records)

    # --- results --------------------------------------------------------------------------

    def on_results(self, node: Node, results: list[tuple[int, int, bytes]]) -> None:
        """Called by a node's reader thread with the ``(task_id, status, payload)`` of a frame.

        Only bookkeeping and dispatch happen here; the futures are resolved on the
        result thread.
        """
        done: list[tuple[TaskRecord, Status, bytes]] = []
        with self.lock:
            for task_id, code, payload in results:
                record = node.inflight.pop(task_id, None)
                if record is None:
                    if self._abandoned.pop(task_id, None) is node:
                        self._tokens.release(node)  # the losing copy of a speculated task ended
                    continue  # or stale: the node was declared lost and the task rerun
                self._tokens.release(node)
                node.tasks_done += 1
                status = Status(code)
                if record.twin is not None and self._drop_twin(record, status):
                    continue
                if status == Status.WORKER_DIED and self._retry(record, pickle.loads(payload)):
                    continue
                if status == Status.OK and self.speculate:
                    self._stragglers.ran(record, time.monotonic())
                done.append((record, status, payload))
            if done:
                self._undelivered += 1
            self._changed.notify_all()
        self._pump()
        if done:
            self._results.put(lambda: self._resolve_all(done, node))

    def _drop_twin(self, record: TaskRecord, status: Status) -> bool:
        """``record`` answered and has a speculative twin (lock held): the first answer
        wins and the other copy is cancelled and forgotten. True if ``record``'s answer
        is dropped (it is a worker death while the twin still runs)."""
        twin = record.twin
        assert twin is not None
        record.twin = twin.twin = None
        on_node = twin.node is not None and twin.node.inflight.get(twin.id) is twin
        if status == Status.WORKER_DIED and on_node:
            return True
        if on_node:
            assert twin.node is not None
            # Its slot stays taken until the node answers (a frozen node never does).
            del twin.node.inflight[twin.id]
            self._abandoned[twin.id] = twin.node
            twin.node.cancel([twin.id])
        return False

    def speculate_stragglers(self) -> None:
        """With ``speculate``, start a second copy of each straggler on another node's
        idle slot: only while nothing is queued (called every second by the monitor)."""
        if not self.speculate:
            return
        now = time.monotonic()
        started = False
        with self.lock:
            if self._queue or self.closed:
                return
            for record in sorted(
                (r for n in self.nodes if n.alive for r in n.inflight.values()),
                key=lambda r: r.started,
            ):
                if record.twin is not None or record.future.done():
                    continue
                median = self._stragglers.median_if_late(record, now)
                if median is None:
                    continue
                node = self._tokens.idle_slot(avoid=record.node)
                if node is None:
                    break
                copy = TaskRecord(
                    next(self._ids), record.payload, record.keys, record.future, record.name
                )
                copy.group, copy.node, copy.attempts, copy.started = record.group, node, 1, now
                copy.twin, record.twin = record, copy
                node.inflight[copy.id] = copy
                self._unsent.setdefault(node, []).append(copy)
                self._unsent_count += 1
                started = True
                self.counts.speculated += 1
                log.info(
                    "task %s has run %.1fs on %s (median %.2fs): started again on %s",
                    record.name,
                    now - record.started,
                    record.node.name if record.node is not None else "?",
                    median,
                    node.name,
                )
        if started:
            self._flush()

    def _retry(self, record: TaskRecord, why: str) -> bool:
        """Requeue ``record`` after a worker death, if it has attempts left (lock held)."""
        record.deaths.append(why)
        if record.future.cancelled() or record.attempts > self.max_retries:
            return False
        record.node = None
        record.sent = False
        self._queue.appendleft(record)
        self.counts.retried += 1
        return True

    def _delivered(self, completed: int, failed: int) -> None:
        with self.lock:
            self._undelivered -= 1
            self.counts.completed += completed
            self.counts.failed += failed
            self._changed.notify_all()

    def _resolve_all(
        self, done: list[tuple[TaskRecord, Status, bytes]], node: Node
    ) -> tuple[int, int]:
        completed = failed = 0
        for record, status, payload in done:
            outcome = settle(record, status, payload, node, self.max_retries)
            completed += outcome is True
            failed += outcome is False
        return completed, failed

    def _fail_later(self, failed: list[tuple[TaskRecord, BaseException]]) -> None:
        """Have the result thread fail tasks that cannot run any more (lock not held)."""
        if not failed:
            return
        with self.lock:
            self._undelivered += 1
        self._results.put(
            lambda: (0, sum(settle_future(r.future.set_exception, e) for r, e in failed))
        )

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
            reclaimed = self._tokens.lost(node)
            node.alive = False
            log.warning("node %s lost: %s", node.name, reason)
            records = sorted(node.inflight.values(), key=lambda r: r.id)
            node.inflight.clear()
            for task_id in [t for t, n in self._abandoned.items() if n is node]:
                del self._abandoned[task_id]
            for record in reversed(records):
                twin = record.twin
                if twin is not None:  # the other copy runs on: it settles the future
                    record.twin = twin.twin = None
                    continue
                if reclaimed:  # a spot reclaim is no fault of the task: it costs no retry
                    record.attempts -= 1
                retried = self._retry(record, f"{node.name} was lost ({reason})")
                if not retried and not record.future.cancelled():
                    failed.append((record, lost_error(record, self.max_retries)))
        replacing = self.replace is not None and self.replace(node, reason)
        with self.lock:
            if replacing:
                self.restarting += 1
            failed.extend(self._fail_if_no_workers())
            self._changed.notify_all()
        self._fail_later(failed)
        self._pump()

    def node_replaced(self, old: Node, new: Node | None) -> None:
        """A replacement for ``old`` finished starting (``new``) or failed (``None``)."""
        with self.lock:
            self.restarting -= 1
            if new is not None and not self.closed:
                self.nodes[self.nodes.index(old)] = new
                self._tokens.add([new])
            failed = self._fail_if_no_workers()
            self._changed.notify_all()
        self._fail_later(failed)
        self._pump()

    def _fail_if_no_workers(self) -> list[tuple[TaskRecord, BaseException]]:
        """With no live node and none coming back, queued work fails (lock held)."""
        if any(n.alive for n in self.nodes) or self.restarting or self.closed:
            return []
        message = no_workers_message(self.nodes)
        failed: list[tuple[TaskRecord, BaseException]] = []
        while self._queue:
            failed.append((self._queue.popleft(), NoWorkersError(message)))
        return failed

    # --- cancellation / shutdown ----------------------------------------------------------

    def cancel_task(self, record: TaskRecord) -> None:
        """``record``'s future was cancelled: a task already on a node is stopped there.

        A queued one is dropped when dispatch reaches it.
        """
        with self.lock:
            self.counts.cancelled += 1
            copies = [r for r in (record, record.twin) if r is not None]
            stops = [
                (r.node, r.id)
                for r in copies
                if r.sent and r.node is not None and r.node.alive and r.node.inflight.get(r.id) is r
            ]
        for node, task_id in stops:
            node.cancel([task_id])

    def close(self, cancel: bool = True) -> None:
        """Refuse new tasks; cancel queued and running ones when ``cancel``."""
        with self.lock:
            self.closed = True
            queued = list(self._queue) if cancel else []
            if cancel:
                self._queue.clear()
            inflight = [r for n in self.nodes for r in n.inflight.values()] if cancel else []
            self._changed.notify_all()
        for record in queued + inflight:
            record.future.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """End the result thread once it has resolved what it holds (waits ``timeout`` at
        most for done-callbacks still running)."""
        self._results.stop(timeout)

    def wait_idle(self) -> None:
        """Wait until no task is queued, running, or waiting for its future to be resolved;
        or until no live slot is left to run them.

        Called from a done-callback, the result thread's own pending work does not count.
        """
        on_result_thread = self._results.current

        def settled() -> bool:
            live = [n for n in self.nodes if n.alive]
            return not live or (
                (on_result_thread or not self._undelivered)
                and not self._queue
                and not any(n.inflight for n in live)
            )

        with self._changed:
            self._changed.wait_for(settled)

    def stats(self) -> dict[str, Any]:
        """Task counters."""
        with self.lock:
            running = sum(len(n.inflight) for n in self.nodes)
            return {
                **dataclasses.asdict(self.counts),
                "queued": len(self._queue),
                "running": running,
            }


__all__ = ["Scheduler", "SkywardFuture", "CancelledError"]
