"""``sky.Compute``: the cluster's lifecycle and the ``concurrent.futures.Executor`` API.

Enter: compose the image from the plugins, let the provider create the nodes,
open them all concurrently and check versions (:mod:`skyward.startup`), start
the heartbeat monitor that also restarts lost nodes (:mod:`skyward.monitor`),
enter each plugin's ``around_client`` in order. Exit (on every path): leave the
plugins in reverse, cancel what is left, stop every agent, then let the provider
release what it created. :mod:`skyward.safety` runs that exit on SIGTERM and at
interpreter exit too.
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import ExitStack
from types import TracebackType
from typing import Any, TypeVar

from skyward import safety, wire
from skyward.agent import spot
from skyward.calls import Call, chunks, in_order
from skyward.channel import Channel
from skyward.errors import ComputeStateError
from skyward.messages import Handler, MessageHandlers
from skyward.monitor import NodeMonitor
from skyward.node import Node
from skyward.plugins import around_client, compose_image, manager, worker_initializers
from skyward.progress import Progress, TaskCounts
from skyward.providers import ClusterSpec, Provider
from skyward.providers.local import Local
from skyward.safety import current, running_here
from skyward.scheduler import Scheduler
from skyward.spec import Image, Worker
from skyward.startup import NodeStarter
from skyward.waits import retries

__all__ = ["Call", "Compute", "current", "running_here"]

log = logging.getLogger("skyward")

T = TypeVar("T")


class Compute(Executor):
    """A cluster of worker nodes, usable as a context manager and an ``Executor``.

    Args:
        provider: where nodes run: ``sky.Local()`` (default), ``sky.SSH(...)``, ``sky.AWS(...)``.
        nodes: number of nodes.
        min_nodes: nodes that must be up before the block is entered (default: all).
            The others go on starting in the background and take work as they join;
            one that fails to start is retried within ``restarts`` and never fails
            the cluster once ``min_nodes`` are up.
        vcpus: per-node CPU hint for cloud providers.
        memory: per-node memory hint (GiB) for cloud providers.
        worker: slots and executor of each node.
        image: what each node has installed; plugins add to it.
        plugins: plugin objects, e.g. ``[sky.plugins.joblib()]``.
        max_retries: times a task is rerun after the node running it is lost.
        restarts: times a lost node is restarted through its provider (0: never).
        heartbeat_timeout: seconds of silence after which a node is declared lost.
        connect_timeout: seconds allowed for each node to start and say hello.
        progress: also show task completion on the terminal's status line (node
            start-up is always shown there when stderr is a terminal).
        blob_cache_bytes: bytes of large arguments each agent keeps (least recently
            used dropped first; a dropped one is sent again when a task needs it).
        speculate: start a straggler again on another node when nothing is queued and
            a slot is idle (a task running 3x the median of its call, 2 s at least);
            the first copy to finish wins, the other is cancelled. Only for tasks
            without side effects: a task may run twice, partly or fully.
    """

    def __init__(
        self,
        provider: Provider | None = None,
        nodes: int = 1,
        min_nodes: int | None = None,
        vcpus: int | None = None,
        memory: float | None = None,
        worker: Worker | None = None,
        image: Image | None = None,
        plugins: Sequence[object] = (),
        *,
        max_retries: int = 2,
        restarts: int = 3,
        heartbeat_timeout: float = 10.0,
        connect_timeout: float = 120.0,
        progress: bool = False,
        blob_cache_bytes: int = 4 * 1024**3,
        speculate: bool = False,
    ) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int):
            raise TypeError(f"Compute(nodes=...) must be an int >= 1, got {nodes!r}")
        if nodes < 1:
            raise ValueError(
                f"Compute(nodes={nodes}) is invalid: a cluster needs at least one node, "
                "use nodes=1 or more"
            )
        if min_nodes is None:
            min_nodes = nodes
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int):
            raise TypeError(f"Compute(min_nodes=...) must be an int or None, got {min_nodes!r}")
        if not 1 <= min_nodes <= nodes:
            raise ValueError(
                f"Compute(nodes={nodes}, min_nodes={min_nodes}) is invalid: min_nodes is how "
                "many of the nodes must be up before the block is entered, between 1 and nodes"
            )
        if vcpus is not None and (not isinstance(vcpus, int) or vcpus < 1):
            raise ValueError(f"Compute(vcpus={vcpus!r}) must be a positive int or None")
        if max_retries < 0 or restarts < 0:
            raise ValueError(
                f"Compute(max_retries={max_retries}, restarts={restarts}): both must be >= 0"
            )
        if heartbeat_timeout <= 0:
            raise ValueError(f"Compute(heartbeat_timeout={heartbeat_timeout}) must be > 0")
        if isinstance(plugins, (str, bytes)) or not isinstance(plugins, Iterable):
            raise TypeError("Compute(plugins=...) takes a list of plugin objects")
        self.provider: Provider = provider if provider is not None else Local()
        if not isinstance(self.provider, Provider):
            raise TypeError(
                f"Compute(provider=...) must be a provider such as sky.Local(), sky.SSH(...) "
                f"or sky.AWS(...), got {self.provider!r}"
            )
        self.worker = worker if worker is not None else Worker()
        if not isinstance(self.worker, Worker):
            raise TypeError(f"Compute(worker=...) must be a sky.Worker, got {self.worker!r}")
        self.base_image = image if image is not None else Image()
        self.plugins: list[object] = list(plugins)
        self._pm = manager(self.plugins)
        self.node_count = nodes
        self.min_nodes = min_nodes
        self.vcpus = vcpus
        self.memory = memory
        self.max_retries = max_retries
        self.restarts = restarts
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.progress = progress
        self.blob_cache_bytes = blob_cache_bytes
        self.speculate = speculate
        self._display = Progress()
        self.task_counts = TaskCounts()
        """The user's tasks (a joblib batch counts as its tasks), for progress and stats()."""
        self._ready_count = 0
        self.cluster_id = uuid.uuid4().hex[:12]
        self.image: Image = self.base_image
        self._state = "new"
        self._lock = threading.Lock()
        self._stack: ExitStack | None = None
        self._scheduler: Scheduler | None = None
        self._starter: NodeStarter | None = None
        self._monitor: NodeMonitor | None = None
        self._blobs = wire.BlobRegistry()
        self._messages = MessageHandlers()
        self._started_at = 0.0
        self.nodes: list[Node] = []

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Compute:
        with self._lock:
            if self._state == "running":
                raise ComputeStateError(
                    "this Compute is already running: a Compute object can be entered once; "
                    "create a second sky.Compute(...) for a second cluster"
                )
            if self._state == "closed":
                raise ComputeStateError(
                    "this Compute was already used and shut down: create a new "
                    "sky.Compute(...) for a new cluster"
                )
            self._state = "running"
        started = time.monotonic()
        stack = ExitStack()
        self._stack = stack
        try:
            self._start(stack)
        except BaseException:
            self._state = "closed"
            self._stack = None
            self._display.close()
            stack.close()
            raise
        self._started_at = time.monotonic()
        starting = self.node_count - len(self.nodes)
        log.info(
            "cluster %s ready: %d node(s), %d slot(s) in %.2fs%s",
            self.cluster_id,
            len(self.nodes),
            self.total_slots,
            self._started_at - started,
            f"; {starting} more node(s) joining as they start" if starting > 0 else "",
        )
        return self

    def start(self) -> Compute:
        """Start the cluster without a ``with`` block (a notebook keeps it across cells).

        ``compute = sky.Compute(...).start()`` is ``with sky.Compute(...) as compute:``
        without the end of the block: call :meth:`close` when done. Until then the
        same safety net holds: the cluster stops at interpreter exit and on SIGTERM,
        and the agents exit on their own when this process dies.
        """
        return self.__enter__()

    def close(self) -> None:
        """Stop a cluster started with :meth:`start`, as leaving a ``with`` block does:
        submitted tasks finish first. Calling it again does nothing."""
        self.shutdown(wait=True)

    def _start(self, stack: ExitStack) -> None:
        self.image = compose_image(self.base_image, self._pm, self.plugins)
        spec = ClusterSpec(
            self.node_count, self.worker, self.image, self.cluster_id, self.vcpus, self.memory
        )
        self.provider.check(spec)
        initializers = worker_initializers(self._pm, self.plugins)
        # From here on SIGTERM and interpreter exit unwind into the teardown, so a
        # provider interrupted while creating machines still removes them.
        safety.register(self, stack)
        stack.callback(self._blobs.clear)
        stack.callback(self._messages.close)
        t0 = time.monotonic()
        launchers = self.provider.launch(spec, stack)
        log.info("provisioned %d node(s) in %.2fs", len(launchers), time.monotonic() - t0)
        hello = {
            "concurrency": self.worker.concurrency,
            "executor": self.worker.executor,
            "env": dict(self.image.env),
            "idle_timeout": max(60.0, 6 * self.heartbeat_timeout),
            "blob_cache_bytes": self.blob_cache_bytes,
            "initializers": initializers,
            **self.provider.agent_config(),
        }
        starter = NodeStarter(launchers, hello, self._new_node, self.connect_timeout)
        self._starter = starter
        scheduler = Scheduler(max_retries=self.max_retries, speculate=self.speculate)
        self._scheduler = scheduler
        stack.callback(scheduler.stop)
        stack.callback(self._stop_nodes)
        self._display.show(lambda: f"{starter.ready}/{len(launchers)} node(s) ready")
        monitor = NodeMonitor(self.nodes, scheduler, starter, self.heartbeat_timeout, self.restarts)
        self._monitor = monitor
        stack.callback(monitor.close)
        scheduler.replace = monitor.replace
        scheduler.expect(len(launchers))
        monitor.add(starter.open_all(self.min_nodes, monitor.joined))
        monitor.start()
        stack.callback(self._display.close)
        if self.progress:
            self._display.show(self._task_status)
        else:
            self._display.close()
        stack.enter_context(around_client(self, self._pm, self.plugins))

    def _new_node(self, index: int, channel: Channel) -> Node:
        node = Node(index, channel, self.worker.concurrency, self._blobs)
        node.on_message = self._on_node_message
        return node

    def _on_node_message(self, node: Node, body: bytes) -> None:
        """A node's ``MESSAGE``: the agent's spot notice is the cluster's, the rest are
        tasks' messages for the ``on_message`` handlers."""
        _, topic, payload = pickle.loads(body)
        if topic == spot.TOPIC and self._monitor is not None:
            self._monitor.reclaim(node, pickle.loads(payload))
        else:
            self._messages.deliver(node, body)

    def _task_status(self) -> str:
        tasks = self._scheduler.stats() if self._scheduler is not None else {}
        retried = f", {tasks['retried']} rerun" if tasks.get("retried") else ""
        return f"{self.task_counts.line()}{retried}, {self.total_slots} slot(s)"

    def _stop_nodes(self) -> None:
        t0 = time.monotonic()
        self._display.close()
        if self._starter is not None:
            self._starter.abort()  # restarts in progress
        if self._scheduler is not None:
            self._scheduler.close(cancel=True)
        log.info("%s", self._summary())
        stoppers = [
            threading.Thread(target=node.stop, name=f"skyward-stop-{node.name}", daemon=True)
            for node in self.nodes
        ]
        for thread in stoppers:
            thread.start()
        deadline = time.monotonic() + 10
        for thread in stoppers:
            thread.join(max(0.0, deadline - time.monotonic()))
        log.info("cluster %s stopped in %.2fs", self.cluster_id, time.monotonic() - t0)

    def _summary(self) -> str:
        """One line for the log at exit: tasks, bytes, per-node utilization."""
        stats = self.stats(refresh=True, timeout=0.5)
        tasks = stats["tasks"]
        elapsed = max(time.monotonic() - self._started_at, 1e-9) if self._started_at else 0.0
        sent = sum(n["bytes_sent"] for n in stats["nodes"].values())
        received = sum(n["bytes_received"] for n in stats["nodes"].values())
        usage = ", ".join(
            f"{name} {_utilization(n, elapsed):.0%}" for name, n in stats["nodes"].items()
        )
        extra = self.provider.summary(self.cluster_id)
        reclaims = len(self._monitor.reclaimed) if self._monitor is not None else 0
        return (
            f"cluster {self.cluster_id} summary: {tasks.get('completed', 0)} task(s) done, "
            f"{tasks.get('retried', 0)} retried, {tasks.get('failed', 0)} failed, "
            f"{tasks.get('cancelled', 0)} cancelled; sent {_size(sent)}, received "
            f"{_size(received)} in {elapsed:.1f}s; utilization {usage or 'n/a'}"
            f"{f'; {reclaims} spot reclaim(s)' if reclaims else ''}"
            f"{f'; {extra}' if extra else ''}"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=exc_type is None, cancel_futures=exc_type is not None)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the cluster. With ``wait``, first let submitted tasks finish."""
        with self._lock:
            if self._state != "running":
                return
            self._state = "closing"
            if self._monitor is not None:
                self._monitor.stop_restarts()
        try:
            if wait and not cancel_futures and self._scheduler is not None:
                self._scheduler.wait_idle()
        finally:
            stack, self._stack = self._stack, None
            self._state = "closed"
            if stack is not None:
                stack.close()

    # --- Executor API ---------------------------------------------------------------------

    def _running_scheduler(self) -> Scheduler:
        if self._state != "running" or self._scheduler is None:
            state = "was shut down" if self._state in ("closing", "closed") else "is not started"
            raise ComputeStateError(
                f"this Compute {state}: call submit/map inside `with sky.Compute(...) as compute:` "
                "or between compute.start() and compute.close()"
            )
        return self._scheduler

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on the cluster; return a future for its result.

        Arguments are read when ``submit`` is called, large arrays included: change
        one in place and submit again, and the task sees the new content.
        """
        return self._submit(fn, args, kwargs, None)

    def _submit(
        self,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: wire.CallScope | None,
    ) -> Future[T]:
        scheduler = self._running_scheduler()
        payload, keys = wire.dumps_task(fn, args, kwargs, self._blobs, scope)
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        count = self.task_counts.add(fn, args)
        future = scheduler.submit(payload, keys, name, None if scope is None else id(scope))
        keys.watch(future)  # its blobs are let go when it is done, sent or not
        future.add_done_callback(functools.partial(self.task_counts.finish, count))
        return future

    def call(self) -> Call:
        """Start one call made of many tasks (what :meth:`map` and a joblib ``Parallel``
        call are): within it, a large argument is pickled and hashed once per object.

        Submit its tasks with :meth:`Call.submit` and close it when the call ends.
        """
        self._running_scheduler()
        return Call(self, self._blobs.scope())

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`; ``chunksize`` batches calls per task.

        Every task is submitted before this returns, as one :meth:`call`: a large
        argument is pickled once per ``map``, however many items name it.
        """
        if chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        end = None if timeout is None else time.monotonic() + timeout
        with self.call() as call:
            if chunksize == 1:
                futures = [call.submit(fn, *args) for args in zip(*iterables, strict=False)]
                return in_order(futures, end)
            runner = wire.ChunkRunner(fn)
            pieces = chunks(zip(*iterables, strict=False), chunksize)
            batches = [call.submit(runner, chunk) for chunk in pieces]
        return (value for chunk in in_order(batches, end) for value in chunk)

    def on_message(self, topic: str, handler: Handler | None) -> None:
        """Run ``handler(message)`` on the client for each ``skyward.agent.emit(topic, message)``.

        Tasks call :func:`skyward.agent.emit` to report while they run (progress,
        scores); the handler runs on a client thread of its own, and ``emit`` returns
        its value (or raises its exception) once it returns. ``None`` removes the handler.
        """
        self._messages.set(topic, handler)

    # --- introspection --------------------------------------------------------------------

    @property
    def total_slots(self) -> int:
        """Slots of the live nodes: nodes x concurrency while all are up."""
        return self._scheduler.live_slots if self._scheduler is not None else 0

    @property
    def running(self) -> bool:
        """Whether the cluster is up."""
        return self._state == "running"

    def stats(self, refresh: bool = False, timeout: float = 5.0) -> dict[str, Any]:
        """Counters: tasks, spot reclaims, and per node bytes sent/received, blobs, agent
        cache hits.

        With ``refresh``, first ask every live agent for fresh counters, waiting at
        most ``timeout`` seconds for their answers.
        """
        if refresh:
            before = {n.name: n.heartbeats for n in self.nodes if n.alive}
            for node in self.nodes:
                if node.alive:
                    node.heartbeat()
            for _ in retries(time.monotonic() + timeout, 0.005):
                if not any(n.alive and n.heartbeats == before.get(n.name, 0) for n in self.nodes):
                    break
        tasks = self._scheduler.stats() if self._scheduler is not None else {}
        return {
            "cluster": self.cluster_id,
            "tasks": tasks,
            "progress": self.task_counts.snapshot(),
            "nodes": {n.name: n.stats() for n in self.nodes},
            "reclaims": len(self._monitor.reclaimed) if self._monitor is not None else 0,
        }

    def __repr__(self) -> str:
        live = sum(1 for n in self.nodes if n.alive)
        tasks = self._scheduler.stats() if self._scheduler is not None else {}
        work = (
            f"; tasks {tasks.get('completed', 0)} done, {tasks.get('running', 0)} running, "
            f"{tasks.get('queued', 0)} queued, {tasks.get('failed', 0)} failed"
            if tasks
            else ""
        )
        return (
            f"<Compute {self.cluster_id} {self._state}: {type(self.provider).__name__}, "
            f"{live}/{self.node_count} node(s) up, {self.total_slots} slot(s) "
            f"({self.worker.concurrency}/node, {self.worker.executor}){work}>"
        )


def _utilization(node: dict[str, Any], elapsed: float) -> float:
    busy = float(node.get("busy_seconds", 0.0))
    return busy / (node["slots"] * elapsed) if elapsed > 0 else 0.0


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
