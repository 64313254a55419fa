"""A submitted task as the client tracks it: its future, its record, what became of it.

:func:`settle` turns an agent's answer into the future's result or exception; the
scheduler calls it on its result thread, never on a node's I/O thread.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from skyward import wire
from skyward.errors import WorkerDiedError
from skyward.wire import Status

if TYPE_CHECKING:
    from skyward.node import Node
    from skyward.scheduler import Scheduler

__all__ = ["ResultThread", "SkywardFuture", "TaskCounts", "TaskRecord", "settle"]

log = logging.getLogger("skyward")


class SkywardFuture(Future[Any]):
    """A :class:`concurrent.futures.Future` whose :meth:`cancel` also stops running tasks.

    The future stays in the standard *pending* state while its task runs on a
    node, so the standard :meth:`cancel` applies to it: ``wait``, ``as_completed``
    and done-callbacks see the cancellation at once, and the node is told to
    stop the task. :meth:`running` says whether the task has been sent to a node.
    """

    _record: TaskRecord | None = None
    _scheduler: Scheduler | None = None
    _notified = False

    def cancel(self) -> bool:
        """Cancel the task: a queued one never starts, a running one is stopped on its node.

        Returns False only when the task has already finished.
        """
        if not super().cancel():
            return False
        with _NOTIFY_LOCK:
            if self._notified:
                return True
            self._notified = True
            # Standard executors call this when they dequeue the cancelled item; ours
            # has no such moment for a running task, so waiters are woken here.
            self.set_running_or_notify_cancel()
        if self._scheduler is not None and self._record is not None:
            self._scheduler.cancel_task(self._record)
        return True

    def running(self) -> bool:
        """Whether the task has been sent to a node and has not finished yet.

        Unlike a standard future's, a running task can still be cancelled.
        """
        record = self._record
        return record is not None and record.node is not None and not self.done()


_NOTIFY_LOCK = threading.Lock()


class TaskRecord:
    """One submitted task as the scheduler tracks it."""

    __slots__ = (
        "id",
        "payload",
        "keys",
        "future",
        "attempts",
        "node",
        "name",
        "deaths",
        "group",
        "started",
        "twin",
        "sent",
    )

    def __init__(
        self,
        task_id: int,
        payload: bytes,
        keys: tuple[str, ...],
        future: SkywardFuture,
        name: str,
        group: object = None,
    ) -> None:
        self.id = task_id
        self.payload = payload
        self.keys = keys
        self.future = future
        self.attempts = 0
        self.node: Node | None = None  # set while the task is on a node
        self.name = name
        self.deaths: list[str] = []
        self.group = group  # tasks whose run times are compared (one call)
        self.started = 0.0  # time.monotonic() of the last dispatch
        self.twin: TaskRecord | None = None  # the other copy of a speculated task
        self.sent = False  # written to its node (see Scheduler._flush)


@dataclasses.dataclass
class TaskCounts:
    """What became of a scheduler's tasks (see :meth:`Scheduler.stats`)."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    cancelled: int = 0
    speculated: int = 0


def settle(
    record: TaskRecord, status: Status, payload: bytes, node: Node, max_retries: int
) -> bool | None:
    """Settle ``record``'s future: True if it completed, False if it failed, None if
    it was already settled (cancelled)."""
    future = record.future
    if future.done():
        return None
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
            return True if settle_future(future.set_result, value) else None
        if status == Status.ERROR:
            error = wire.loads_error(payload)
        elif status == Status.WORKER_DIED:
            causes = "; ".join(dict.fromkeys(record.deaths))
            error = WorkerDiedError(
                f"task {record.name} killed its worker on each of its {record.attempts} "
                f"attempt(s): {causes}. It was not retried further "
                f"(max_retries={max_retries}); the rest of the cluster keeps running"
            )
        else:  # CANCELLED: only ever the answer to a cancel, so the future is cancelled
            future.cancel()
            return None
    except Exception as exc:  # noqa: BLE001
        error = exc
    return False if settle_future(future.set_exception, error) else None


def settle_future(method: Callable[[Any], None], outcome: Any) -> bool:
    """Set a future's result or exception; False if it was settled (cancelled) before."""
    try:
        method(outcome)
    except InvalidStateError:
        return False
    return True


def lost_error(record: TaskRecord, max_retries: int) -> BaseException:
    causes = "; ".join(dict.fromkeys(record.deaths))
    return WorkerDiedError(
        f"task {record.name} was running on a node that was lost on each of its "
        f"{record.attempts} attempt(s) ({causes}); giving up after "
        f"max_retries={max_retries}. If the task itself crashes its worker (os._exit, "
        "segfault, out of memory), fix the task; otherwise raise max_retries"
    )


def no_workers_message(nodes: list[Node]) -> str:
    names = ", ".join(n.name for n in nodes) or "none"
    return (
        f"no live worker node is left (lost: {names}); the remaining tasks cannot run. "
        "Check the nodes' stderr above for the cause and start a new Compute"
    )


Job = Callable[[], tuple[int, int]]
"""Work for the :class:`ResultThread`: settles futures, returns ``(completed, failed)``."""


class ResultThread:
    """The client's one thread that settles futures.

    Results are unpickled and done-callbacks run here, in the order the jobs came,
    never on an I/O thread: they are user code, and a slow one must not stall the
    frames (heartbeats) behind it. ``on_done(completed, failed)`` follows each job.
    """

    def __init__(self, on_done: Callable[[int, int], object]) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="skyward-results", daemon=True)
        self._thread.start()

    @property
    def current(self) -> bool:
        """Whether the caller is this thread (a done-callback)."""
        return threading.current_thread() is self._thread

    def put(self, job: Job) -> None:
        """Run ``job`` after the jobs already handed over."""
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            counts = (0, 0)
            try:
                counts = job()
            except BaseException:  # noqa: BLE001 - a done-callback's error must not end the thread
                log.exception("error while resolving a task's future")
            self._on_done(*counts)

    def stop(self, timeout: float) -> None:
        """End once the jobs handed over are done (waits ``timeout`` at most for them)."""
        self._jobs.put(None)
        if self.current:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("a done-callback is still running after %.0fs; not waiting for it", timeout)
