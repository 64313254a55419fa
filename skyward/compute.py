"""``sky.Compute``: the cluster's lifecycle and the ``concurrent.futures.Executor`` API.

Enter: compose the image from the plugins, let the provider start the nodes,
open every node's channel concurrently, check versions, start the heartbeat
monitor, enter each plugin's ``around_client`` in order. Exit (on every path):
leave the plugins in reverse, cancel what is left, stop every agent, then let
the provider release what it created.
"""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from contextlib import ExitStack
from types import TracebackType
from typing import Any, TypeVar

from skyward import wire
from skyward.channel import Channel
from skyward.messages import Handler, MessageHandlers
from skyward.node import Node, NodeStartError
from skyward.plugins import around_client, compose_image, manager, worker_initializers
from skyward.progress import Progress, TaskCounts
from skyward.providers import ClusterSpec, Launcher, Provider
from skyward.providers.local import Local
from skyward.scheduler import Scheduler
from skyward.spec import Image, Worker

log = logging.getLogger("skyward")

T = TypeVar("T")

_active: list[Compute] = []
_active_lock = threading.Lock()

# Seconds an interrupted start-up waits for the aborted node starts to end (each kills
# what it started itself if it ends later).
_ABORT_GRACE = 1.0


def current() -> Compute | None:
    """The innermost running ``Compute`` of this process, if any."""
    with _active_lock:
        return _active[-1] if _active else None


class ComputeStateError(RuntimeError):
    """A ``Compute`` was used outside its ``with`` block, or entered twice."""


class Compute(Executor):
    """A cluster of worker nodes, usable as a context manager and an ``Executor``.

    Args:
        provider: where nodes run: ``sky.Local()`` (default), ``sky.SSH(...)``, ``sky.AWS(...)``.
        nodes: number of nodes.
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
    """

    def __init__(
        self,
        provider: Provider | None = None,
        nodes: int = 1,
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
    ) -> None:
        if isinstance(nodes, bool) or not isinstance(nodes, int):
            raise TypeError(f"Compute(nodes=...) must be an int >= 1, got {nodes!r}")
        if nodes < 1:
            raise ValueError(
                f"Compute(nodes={nodes}) is invalid: a cluster needs at least one node, "
                "use nodes=1 or more"
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
        self.vcpus = vcpus
        self.memory = memory
        self.max_retries = max_retries
        self.restarts = restarts
        self._launchers: list[Launcher] = []
        self._restarted: list[int] = []
        # Node starts in progress (index -> its channel once the launcher returned it),
        # and whether they are being aborted (Ctrl-C, a failed start, shutdown).
        self._starting: dict[int, Channel | None] = {}
        self._aborted = False
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.progress = progress
        self.blob_cache_bytes = blob_cache_bytes
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
        self._blobs = wire.BlobRegistry()
        self._messages = MessageHandlers()
        self._initializers: list[str] = []
        self._monitor_stop = threading.Event()
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
        log.info(
            "cluster %s ready: %d node(s), %d slot(s) in %.2fs",
            self.cluster_id,
            len(self.nodes),
            self.total_slots,
            self._started_at - started,
        )
        return self

    def _start(self, stack: ExitStack) -> None:
        self.image = compose_image(self.base_image, self._pm, self.plugins)
        spec = ClusterSpec(
            nodes=self.node_count,
            worker=self.worker,
            image=self.image,
            cluster_id=self.cluster_id,
            vcpus=self.vcpus,
            memory=self.memory,
        )
        self.provider.check(spec)
        self._initializers = worker_initializers(self._pm, self.plugins)
        # From here on SIGTERM and interpreter exit unwind into the teardown, so a
        # provider interrupted while creating machines still removes them.
        _register(self, stack)
        stack.callback(self._blobs.clear)
        stack.callback(self._messages.close)
        t0 = time.monotonic()
        launchers = self.provider.launch(spec, stack)
        log.info("provisioned %d node(s) in %.2fs", len(launchers), time.monotonic() - t0)
        self._launchers = launchers
        self._restarted = [0] * len(launchers)
        scheduler = Scheduler(max_retries=self.max_retries)
        scheduler.replace = self._replace
        self._scheduler = scheduler
        stack.callback(scheduler.stop)
        stack.callback(self._stop_nodes)
        self.nodes = self._connect()
        for node in self.nodes:
            node.start(scheduler)
        scheduler.add_nodes(self.nodes)
        monitor = threading.Thread(target=self._monitor, name="skyward-monitor", daemon=True)
        monitor.start()
        stack.callback(monitor.join, 5)
        stack.callback(self._monitor_stop.set)
        stack.callback(self._display.close)
        if self.progress:
            self._display.show(self._task_status)
        else:
            self._display.close()
        stack.enter_context(around_client(self, self._pm, self.plugins))

    def _open_node(self, index: int) -> Node:
        """Start node ``index``'s agent through its launcher and shake hands (bounded).

        :meth:`_abort_starts` can end it from another thread at any step; whatever it
        started is then stopped here.
        """
        launcher = self._launchers[index]
        t0 = time.monotonic()
        with self._lock:
            if self._aborted:
                raise NodeStartError(f"{launcher.name}: start aborted (step: start agent)")
            self._starting[index] = None
        try:
            node = self._start_and_greet(index, launcher)
        finally:
            with self._lock:
                self._starting.pop(index, None)
                aborted = self._aborted
        if aborted:
            node.stop(timeout=1.0, kill=True)
            raise NodeStartError(f"{launcher.name}: start aborted (step: handshake)")
        log.info("node %s ready in %.2fs (pid %s)", node.name, time.monotonic() - t0, node.pid)
        with self._lock:
            self._ready_count += 1
        return node

    def _start_and_greet(self, index: int, launcher: Launcher) -> Node:
        try:
            channel = launcher.open()
        except NodeStartError:
            raise
        except Exception as exc:
            raise NodeStartError(
                f"{launcher.name}: {type(exc).__name__}: {exc} (step: start agent)"
            ) from exc
        with self._lock:
            aborted = self._aborted
            if not aborted:
                self._starting[index] = channel
        if aborted:
            channel.kill()
            raise NodeStartError(f"{launcher.name}: start aborted (step: start agent)")
        node = Node(index, channel, self.worker.concurrency, self._blobs)
        config = {
            "node": launcher.name,
            "concurrency": self.worker.concurrency,
            "executor": self.worker.executor,
            "env": dict(self.image.env),
            "idle_timeout": max(60.0, 6 * self.heartbeat_timeout),
            "blob_cache_bytes": self.blob_cache_bytes,
            "initializers": self._initializers,
        }
        node.on_message = self._messages.deliver
        try:
            node.handshake(config, self.connect_timeout)
        except BaseException:
            node.stop(timeout=1.0, kill=True)
            raise
        return node

    def _abort_starts(self) -> None:
        """End every node start in progress now, and any that begins later.

        A launcher still opening is aborted (e.g. its SSH connection closed); an agent
        started but not yet greeted is killed. Each start then fails at once.
        """
        with self._lock:
            self._aborted = True
            starting = list(self._starting.items())
        for index, _ in starting:
            self._launchers[index].abort()
        for _, channel in starting:
            if channel is not None:
                channel.kill()

    def _connect(self) -> list[Node]:
        """Open every node concurrently; on a failure stop them all, on Ctrl-C (or SIGTERM)
        abort the starts in progress.

        An interrupt does not wait for the starts (each bounded by ``connect_timeout``):
        they are aborted, and one that still finishes later stops what it started itself
        (see :meth:`_open_node`). The start threads are daemons, so none delays exit.
        """
        count = len(self._launchers)
        self._display.show(lambda: f"{self._ready_count}/{count} node(s) ready")
        futures: list[Future[Node]] = [Future() for _ in range(count)]
        indices = iter(range(count))
        take = threading.Lock()

        def work() -> None:
            while True:
                with take:
                    index = next(indices, None)
                if index is None or not futures[index].set_running_or_notify_cancel():
                    return
                try:
                    futures[index].set_result(self._open_node(index))
                except BaseException as exc:  # noqa: BLE001 - reported by the caller
                    futures[index].set_exception(exc)

        for i in range(min(32, count)):
            threading.Thread(target=work, name=f"skyward-connect-{i}", daemon=True).start()
        try:
            wait(futures)
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise errors[0]  # type: ignore[misc]
            return [f.result() for f in futures]
        except BaseException:
            self._abort_starts()
            for future in futures:
                future.cancel()
            try:
                wait(futures, timeout=_ABORT_GRACE)
            finally:
                for future in futures:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        future.result().stop(timeout=1.0, kill=True)
            raise

    def _replace(self, node: Node, reason: str) -> bool:
        """Scheduler hook: restart a lost node in the background, ``restarts`` times at most."""
        with self._lock:
            if self._state != "running" or self._restarted[node.index] >= self.restarts:
                return False
            self._restarted[node.index] += 1
        threading.Thread(
            target=self._restart, args=(node,), name=f"skyward-restart-{node.name}", daemon=True
        ).start()
        return True

    def _restart(self, old: Node) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        old.stop(timeout=1.0, kill=True)
        new: Node | None = None
        try:
            if self._state == "running":
                new = self._open_node(old.index)
        except Exception as exc:  # noqa: BLE001 - the node stays down; the cluster goes on
            if self._state == "running":
                log.warning("could not restart %s: %s", old.name, exc)
        with self._lock:
            if new is not None and self._state == "running":
                self.nodes[old.index] = new
                new.start(scheduler)
                log.info("node %s restarted", new.name)
            elif new is not None:
                new.stop(timeout=1.0, kill=True)
                new = None
        scheduler.node_replaced(old, new)

    def _monitor(self) -> None:
        """Send heartbeats; declare a node lost when it has been silent too long."""
        interval = min(1.0, self.heartbeat_timeout / 5)
        while not self._monitor_stop.wait(interval):
            scheduler = self._scheduler
            if scheduler is None:
                return
            now = time.monotonic()
            for node in list(self.nodes):
                if not node.alive:
                    continue
                silent = now - node.last_heard
                if silent > self.heartbeat_timeout:
                    scheduler.node_lost(
                        node,
                        f"no heartbeat for {silent:.1f}s (heartbeat_timeout="
                        f"{self.heartbeat_timeout}s)",
                    )
                    threading.Thread(target=node.stop, kwargs={"kill": True}, daemon=True).start()
                else:
                    node.heartbeat()

    def _task_status(self) -> str:
        tasks = self._scheduler.stats() if self._scheduler is not None else {}
        retried = f", {tasks['retried']} rerun" if tasks.get("retried") else ""
        return f"{self.task_counts.line()}{retried}, {self.total_slots} slot(s)"

    def _stop_nodes(self) -> None:
        t0 = time.monotonic()
        self._display.close()
        self._abort_starts()  # restarts in progress
        if self._scheduler is not None:
            self._scheduler.close(cancel=True)
        log.info("%s", self._summary())
        stoppers = [
            threading.Thread(target=node.stop, name=f"skyward-stop-{node.name}", daemon=True)
            for node in self.nodes
        ]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(10)
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
        return (
            f"cluster {self.cluster_id} summary: {tasks.get('completed', 0)} task(s) done, "
            f"{tasks.get('retried', 0)} retried, {tasks.get('failed', 0)} failed, "
            f"{tasks.get('cancelled', 0)} cancelled; sent {_size(sent)}, received "
            f"{_size(received)} in {elapsed:.1f}s; utilization {usage or 'n/a'}"
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
        try:
            if wait and not cancel_futures and self._scheduler is not None:
                scheduler = self._scheduler
                while not scheduler.idle() and scheduler.live_slots:
                    time.sleep(0.01)
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
                f"this Compute {state}: call submit/map inside `with sky.Compute(...) as compute:`"
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
        future = scheduler.submit(payload, keys, name)
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
                return _results(futures, end)
            runner = _ChunkRunner(fn)
            chunks = _chunks(zip(*iterables, strict=False), chunksize)
            batches = [call.submit(runner, chunk) for chunk in chunks]
        return (value for chunk in _results(batches, end) for value in chunk)

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
        """Counters: tasks, and per node bytes sent/received, blobs, agent cache hits.

        With ``refresh``, first ask every live agent for fresh counters, waiting at
        most ``timeout`` seconds for their answers.
        """
        if refresh:
            before = {n.name: n.heartbeats for n in self.nodes if n.alive}
            for node in self.nodes:
                if node.alive:
                    node.heartbeat()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(
                n.alive and n.heartbeats == before.get(n.name, 0) for n in self.nodes
            ):
                time.sleep(0.005)
        tasks = self._scheduler.stats() if self._scheduler is not None else {}
        return {
            "cluster": self.cluster_id,
            "tasks": tasks,
            "progress": self.task_counts.snapshot(),
            "nodes": {n.name: n.stats() for n in self.nodes},
        }

    def __repr__(self) -> str:
        return (
            f"<Compute {self.cluster_id} {self._state} provider={type(self.provider).__name__} "
            f"nodes={self.node_count} slots/node={self.worker.concurrency}>"
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


class Call:
    """One call on a :class:`Compute`: many tasks that name the same data.

    Made by :meth:`Compute.call`. Within a call a large argument object (an array of
    1 MiB or more) and a function pickled by value are pickled and hashed once, then
    named by identity: an in-place change made while the call runs may go unseen by
    its later tasks. Once the call is closed, content decides again.
    """

    def __init__(self, compute: Compute, scope: wire.CallScope) -> None:
        self.compute = compute
        self._scope = scope

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """:meth:`Compute.submit`, as part of this call."""
        return self.compute._submit(fn, args, kwargs, self._scope)

    def close(self) -> None:
        """End the call (tasks already submitted run on)."""
        self._scope.close()

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _results(futures: list[Future[T]], end: float | None) -> Iterator[T]:
    """Yield results in order, as ``Executor.map`` does; cancel the rest on the way out."""
    futures.reverse()
    try:
        while futures:
            future = futures.pop()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            except BaseException:
                future.cancel()
                raise
            del future
            yield value
    finally:
        for future in futures:
            future.cancel()


class _ChunkRunner:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]

    @staticmethod
    def task_count(chunk: list[tuple[Any, ...]]) -> int:
        return len(chunk)  # progress counts the user's calls, not chunks


def _chunks(items: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- process-wide safety net ------------------------------------------------------------------


def _register(compute: Compute, stack: ExitStack) -> None:
    """Track running clusters so interpreter exit and SIGTERM still stop them."""
    with _active_lock:
        _active.append(compute)
        _install_sigterm()

    def unregister() -> None:
        with _active_lock:
            if compute in _active:
                _active.remove(compute)

    stack.callback(unregister)


_sigterm_installed = False


def _install_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``with`` blocks unwind and clusters stop."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    _sigterm_installed = True


@atexit.register
def _shutdown_all() -> None:
    with _active_lock:
        running = list(reversed(_active))
    for compute in running:
        try:
            compute.shutdown(wait=False, cancel_futures=True)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            log.exception("failed to stop cluster %s at exit", compute.cluster_id)
