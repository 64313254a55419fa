"""The agent's serve loop: the handshake, one dispatch table for the client's frames,
thread slots, and the messages tasks send to the client (:func:`emit`).

It reads frames on stdin and writes frames on stdout, and nothing else ever goes
to stdout (``print`` in a task goes to stderr, which providers forward to the
client). It exits as soon as stdin closes, so a client that dies never leaves an
agent behind.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import IO, Any

from skyward import wire
from skyward.agent import spot
from skyward.agent.cache import DEFAULT_CACHE_BYTES, BlobCache
from skyward.agent.cpus import node_cpus
from skyward.agent.slots import ProcessSlots
from skyward.errors import ProtocolError
from skyward.wire import Kind, Status

Task = tuple[int, tuple[str, ...], bytes]
OnReply = Callable[[int, bytes], object]

_current: Agent | None = None


def emit(topic: str, message: object, timeout: float | None = None) -> Any:
    """Send ``message`` from the running task to the client and return the client's answer.

    The client calls the handler registered for ``topic`` with
    :meth:`skyward.Compute.on_message` on a thread of its own (never one that reads
    from nodes) and answers when it returns: ``emit`` returns once the message is
    consumed, with the handler's return value, or raises the handler's exception.
    Only a task running on a Skyward node can call it.
    """
    agent = _current
    if agent is None:
        raise RuntimeError(
            "skyward.agent.emit() sends a message from a task to the client: call it only "
            "in a task running on a Skyward node (Compute.submit, joblib.Parallel in a Compute)"
        )
    answer: Future[tuple[int, bytes]] = Future()
    agent.post(topic, wire.dumps_result(message), lambda *reply: answer.set_result(reply))
    status, body = answer.result(timeout)
    if status != Status.OK:
        raise wire.loads_error(body)
    return pickle.loads(body)


def _log(message: str) -> None:
    sys.stderr.write(f"skyward-agent[{os.getpid()}]: {message}\n")
    sys.stderr.flush()


class ThreadSlots:
    """``executor="thread"``: ``concurrency`` threads, all started at once, taking tasks
    from one queue (lighter per task than a ``ThreadPoolExecutor``: no future, no
    lock, no lazy thread start when the first wave arrives)."""

    def __init__(self, run: Callable[[Task, dict[str, Any]], None], concurrency: int) -> None:
        self._run = run
        self._queue: queue.SimpleQueue[tuple[Task, dict[str, Any]]] = queue.SimpleQueue()
        for index in range(concurrency):
            name = f"skyward-task-{index}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, task: Task, blobs: dict[str, Any]) -> None:
        """Run ``task`` on the next free thread."""
        self._queue.put((task, blobs))

    def _serve(self) -> None:
        while True:
            task, blobs = self._queue.get()
            try:
                self._run(task, blobs)
            except BaseException as exc:  # noqa: BLE001 - the slot must go on serving
                _log(f"task {task[0]} could not be run or answered: {type(exc).__name__}: {exc}")


class Agent:
    """Reads frames, runs tasks, writes results."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes], child: bool) -> None:
        self.reader = reader
        self.child = child
        self.outbox = wire.Outbox(writer, self.exit)
        self.lock = threading.Lock()
        self.cancelled: set[int] = set()
        self.parked: dict[int, tuple[Task, dict[str, Any], set[str]]] = {}
        self.requested: set[str] = set()
        self.last_heard = time.monotonic()
        self.tasks_done = 0
        self.busy = 0.0
        self.config: dict[str, Any] = {}
        self.cache = BlobCache(DEFAULT_CACHE_BYTES, keep_bytes=False)
        self.slots: ProcessSlots | None = None
        self.pool: ThreadSlots | None = None
        self.replies: dict[int, OnReply] = {}
        self.message_ids = itertools.count()

    # --- lifecycle ------------------------------------------------------------------------

    def exit(self, code: int = 0) -> None:
        if self.slots is not None:
            self.slots.kill_all()
        os._exit(code)

    def handshake(self) -> None:
        frame = wire.read_frame(self.reader)
        if frame is None:
            self.exit(0)
        assert frame is not None
        kind, body, _ = frame
        if kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO from the client, got {kind.name}")
        self.config = pickle.loads(body)
        os.environ.update(self.config.get("env", {}))
        for name in self.config.get("initializers", ()):
            _initialize(name)
        concurrency = int(self.config.get("concurrency", 1))
        process = self.config.get("executor") == "process"
        capacity = int(self.config.get("blob_cache_bytes", DEFAULT_CACHE_BYTES))
        self.cache = BlobCache(capacity, keep_bytes=process)
        if process:
            self.slots = ProcessSlots(self, concurrency)
        else:
            self.pool = ThreadSlots(self.run, concurrency)
        info = wire.versions()
        info.update(
            pid=os.getpid(),
            hostname=socket.gethostname(),
            executable=sys.executable,
            cpus=node_cpus(),
        )
        self.outbox.put(wire.encode_obj(Kind.HELLO, info))
        idle = float(self.config.get("idle_timeout", 0))
        if idle > 0 and not self.child:
            threading.Thread(
                target=self._watch_client, args=(idle,), name="skyward-idle", daemon=True
            ).start()
        endpoint = self.config.get("spot_endpoint") or os.environ.get(spot.ENDPOINT_ENV)
        if endpoint and not self.child:
            notice = lambda n: self.post(spot.TOPIC, wire.dumps_result(n), lambda *_: None)  # noqa: E731
            spot.watch(endpoint, notice, _log)

    def _watch_client(self, idle_timeout: float) -> None:
        """Exit when the client has been silent too long (a partition never closes stdin)."""
        while True:
            time.sleep(min(1.0, idle_timeout / 4))
            if time.monotonic() - self.last_heard > idle_timeout:
                _log(f"no word from the client for {idle_timeout:.0f}s; exiting")
                self.exit(3)

    def heartbeat(self) -> None:
        """Answer the client's heartbeat with this agent's counters."""
        stats: dict[str, float] = dict(self.cache.stats())
        stats["tasks_done"] = self.tasks_done
        stats["busy_seconds"] = round(self.busy, 3)
        self.outbox.put(wire.encode_obj(Kind.HEARTBEAT, stats))

    def serve(self) -> None:
        self.handshake()
        frames = wire.Dispatch(
            {
                Kind.TASK: self.on_tasks,
                Kind.BLOB: self.on_blob,
                Kind.CANCEL: self.on_cancel,
                Kind.HEARTBEAT: lambda body: self.heartbeat(),
                Kind.MESSAGE: self.replied,
                Kind.BYE: lambda body: self.exit(0),
            },
            on_frame=self.heard,
        )
        frames.run(self.reader)
        self.exit(0)

    def heard(self, size: int) -> None:
        self.last_heard = time.monotonic()

    def on_tasks(self, body: bytes) -> None:
        for task in pickle.loads(body):
            self.accept(task)

    def on_blob(self, body: bytes) -> None:
        key, value = self.cache.put(body)
        self.unpark(key, value)
        if self.slots is not None:
            self.slots.blob_arrived(key)

    def on_cancel(self, body: bytes) -> None:
        for task_id in pickle.loads(body):
            self.cancel(task_id)

    # --- tasks ----------------------------------------------------------------------------

    def accept(self, task: Task) -> None:
        task_id, keys, _ = task
        found, missing = self.cache.lookup(keys)
        if missing:
            # The parked task holds what it found: blobs arriving later may evict those
            # from a small cache, and asking for them again could go on forever.
            with self.lock:
                self.parked[task_id] = (task, found, set(missing))
            self.request(missing)
            return
        self.start(task, found)

    def request(self, keys: list[str]) -> None:
        """Ask the client (again) for blobs this agent does not hold."""
        with self.lock:
            ask = [k for k in keys if k not in self.requested]
            self.requested.update(ask)
        for key in ask:
            self.outbox.put(wire.encode_obj(Kind.NEED_BLOB, key))

    def unpark(self, key: str, value: Any) -> None:
        ready: list[tuple[Task, dict[str, Any]]] = []
        with self.lock:
            self.requested.discard(key)
            for task_id, (task, found, waiting) in list(self.parked.items()):
                if key in waiting:
                    waiting.discard(key)
                    found[key] = value
                if not waiting:
                    del self.parked[task_id]
                    ready.append((task, found))
        for task, found in ready:
            self.start(task, found)

    def start(self, task: Task, blobs: dict[str, Any]) -> None:
        if self.slots is not None:
            if task[0] in self.cancelled:  # the cancel overtook the task
                self.finish(task[0], Status.CANCELLED, b"")
            else:
                self.slots.submit(task, blobs)
        else:
            assert self.pool is not None
            self.pool.submit(task, blobs)

    def run(self, task: Task, blobs: dict[str, Any]) -> None:
        task_id, _, payload = task
        if task_id in self.cancelled:
            self.finish(task_id, Status.CANCELLED, b"")
            return
        started = time.perf_counter()
        try:
            fn, args, kwargs = wire.loads_task(payload, blobs)
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the client
            status, body = Status.ERROR, wire.dumps_error(_explain(exc), self.where())
        else:
            try:
                status, body = Status.OK, wire.dumps_result(value)
            except Exception as exc:
                error = TypeError(
                    f"the result of task {getattr(fn, '__qualname__', fn)!r} cannot be pickled "
                    f"({type(value).__name__}): {exc}. Return plain data (numbers, arrays, "
                    "dicts) instead of locks, open files, sockets or generators"
                )
                status, body = Status.ERROR, wire.dumps_error(error, self.where())
        if task_id in self.cancelled:
            status, body = Status.CANCELLED, b""
        self.finish(task_id, status, body, time.perf_counter() - started)

    def finish(self, task_id: int, status: Status, body: bytes, busy: float = 0.0) -> None:
        with self.lock:
            self.cancelled.discard(task_id)
        self.forward((task_id, int(status), body), busy)

    def forward(self, result: tuple[int, int, bytes], busy: float) -> None:
        """Send one result and count the slot time it took."""
        with self.lock:
            self.tasks_done += 1
            self.busy += busy
        self.outbox.put_item(Kind.RESULT, result)

    def cancel(self, task_id: int) -> None:
        with self.lock:
            parked = self.parked.pop(task_id, None)
            if parked is None:
                self.cancelled.add(task_id)
        if parked is not None:
            self.finish(task_id, Status.CANCELLED, b"")
        elif self.slots is not None:
            self.slots.cancel(task_id)

    def where(self) -> str:
        return f"{self.config.get('node', 'node')} (pid {os.getpid()})"

    def give_up(self, reason: str) -> None:
        """Tell the client why this agent cannot go on (it declares the node lost), exit."""
        _log(reason)
        self.outbox.put(wire.encode_obj(Kind.BYE, reason))
        deadline = time.monotonic() + 5.0
        while self.outbox.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        self.exit(4)

    # --- messages from tasks to the client ------------------------------------------------

    def post(self, topic: str, payload: bytes, on_reply: OnReply) -> None:
        """Send a task's pickled message to the client; ``on_reply(status, body)`` answers."""
        with self.lock:
            message_id = next(self.message_ids)
            self.replies[message_id] = on_reply
        self.outbox.put(wire.encode_obj(Kind.MESSAGE, (message_id, topic, payload)))

    def replied(self, body: bytes) -> None:
        message_id, status, answer = pickle.loads(body)
        with self.lock:
            on_reply = self.replies.pop(message_id, None)
        if on_reply is not None:
            on_reply(status, answer)


def _initialize(name: str) -> None:
    """Call a plugin's worker initializer ``"module:function"`` (before any task runs)."""
    module, _, function = name.partition(":")
    try:
        getattr(importlib.import_module(module), function)()
    except Exception as exc:
        raise RuntimeError(
            f"worker initializer {name!r} failed: {type(exc).__name__}: {exc} (is the plugin "
            "that provides it installed on the worker, at the client's version?)"
        ) from exc


def _explain(exc: BaseException) -> BaseException:
    """Add the fix to errors whose cause is the worker's environment."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        hint = (
            f"module {exc.name!r} is not installed on the worker: add it to "
            f"sky.Image(pip=[...]) or install it on the worker hosts"
        )
        if hasattr(exc, "add_note"):
            exc.add_note(hint)
    return exc


def main(argv: list[str] | None = None) -> None:
    """Run the agent on this process's stdin/stdout."""
    args = sys.argv[1:] if argv is None else argv
    child = "--child" in args
    # Keep the protocol stream private: fd 1 becomes a copy of stderr for everyone else.
    out = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reader = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _current
    agent = _current = Agent(reader, out, child)
    try:
        agent.serve()
    except Exception as exc:  # noqa: BLE001
        _log(f"fatal: {type(exc).__name__}: {exc}")
        agent.exit(2)
