"""The worker agent: ``python -m skyward.agent``.

It reads frames on stdin and writes frames on stdout, and nothing else ever goes
to stdout (``print`` in a task goes to stderr, which providers forward to the
client). It exits as soon as stdin closes, so a client that dies never leaves an
agent behind.

With ``executor="thread"`` tasks run on a thread pool of ``concurrency``
threads. With ``executor="process"`` each slot is a child agent (this same
module with ``--child``) driven over pipes with the same frames; the parent
never unpickles the task, it routes bytes, ships blobs to the child that needs
them, and replaces a child that dies or whose task is cancelled.
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

from skyward import spot, wire
from skyward.wire import Kind, Status

DEFAULT_CACHE_BYTES = 4 * 1024**3

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
    if agent is None:  # `python -m skyward.agent` runs this file as __main__, not as this module
        agent = getattr(sys.modules.get("__main__"), "_current", None)
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


class BlobCache:
    """Blobs by key, least recently used evicted beyond ``capacity`` bytes.

    Thread mode keeps the unpickled object (arrays made read-only, as loky's
    memmaps are); process mode keeps the raw bytes to forward to child slots.
    """

    def __init__(self, capacity: int, keep_bytes: bool) -> None:
        self.capacity = capacity
        self.keep_bytes = keep_bytes
        self._entries: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.size = 0
        self.hits = 0
        self.misses = 0
        self.received = 0

    def put(self, key: str, data: bytes) -> Any:
        """Hold blob ``key``; return its value (the object, or the bytes in process mode)."""
        value: Any = data
        if not self.keep_bytes:
            value = wire.loads_blob(data)
            if type(value).__name__ == "ndarray" and hasattr(value, "setflags"):
                value.setflags(write=False)
        with self._lock:
            self.received += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self.size -= old[0]
            self._entries[key] = (len(data), value)
            self.size += len(data)
            while self.size > self.capacity and len(self._entries) > 1:
                _, (size, _) = self._entries.popitem(last=False)
                self.size -= size
        return value

    def lookup(self, keys: tuple[str, ...]) -> tuple[dict[str, Any], list[str]]:
        """Return the held values for ``keys`` and the keys that are missing."""
        found: dict[str, Any] = {}
        missing: list[str] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    missing.append(key)
                    self.misses += 1
                else:
                    self._entries.move_to_end(key)
                    found[key] = entry[1]
                    self.hits += 1
        return found, missing

    def stats(self) -> dict[str, int]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_bytes": self.size,
            "blobs_received": self.received,
        }


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
        self.pool: ThreadPoolExecutor | None = None
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
            raise wire.ProtocolError(f"expected HELLO from the client, got {kind.name}")
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
            self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="skyward-task")
            # Start every slot's thread now (the pool starts them lazily, one per submit):
            # otherwise the first wave of tasks pays for thread creation as it arrives.
            ready = threading.Barrier(concurrency)
            for _ in range(concurrency):
                self.pool.submit(ready.wait, 10)
        info = wire.versions()
        info.update(pid=os.getpid(), hostname=socket.gethostname(), executable=sys.executable)
        self.outbox.put(wire.encode_obj(Kind.HELLO, info))
        idle = float(self.config.get("idle_timeout", 0))
        if idle > 0 and not self.child:
            threading.Thread(
                target=self._watch_client, args=(idle,), name="skyward-idle", daemon=True
            ).start()
        # --- spot interruption notices (issue 16; skyward/spot.py) ---
        endpoint = self.config.get("spot_endpoint") or os.environ.get(spot.ENDPOINT_ENV)
        if endpoint and not self.child:
            notice = lambda n: self.post(spot.TOPIC, wire.dumps_result(n), lambda *_: None)  # noqa: E731
            spot.watch(endpoint, notice, _log)
        # --- end spot ---

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
        while True:
            frame = wire.read_frame(self.reader)
            self.last_heard = time.monotonic()
            if frame is None:
                self.exit(0)
            assert frame is not None
            kind, body, _ = frame
            if kind == Kind.TASK:
                for task in pickle.loads(body):
                    self.accept(task)
            elif kind == Kind.BLOB:
                key, data = pickle.loads(body)
                self.unpark(key, self.cache.put(key, data))
                if self.slots is not None:
                    self.slots.blob_arrived(key)
            elif kind == Kind.CANCEL:
                for task_id in pickle.loads(body):
                    self.cancel(task_id)
            elif kind == Kind.HEARTBEAT:
                self.heartbeat()
            elif kind == Kind.MESSAGE:
                self.replied(body)
            elif kind == Kind.BYE:
                self.exit(0)

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
            self.pool.submit(self.run, task, blobs)

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
            wire.encode(Kind.BLOB, pickle.dumps((key, data), protocol=wire.PICKLE_PROTOCOL))
            for key, data in blobs.items()
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
        while True:
            try:
                frame = wire.read_frame(proc.stdout)
            except Exception:  # noqa: BLE001 - killed mid-frame, or garbage: end it
                self.kill()
                frame = None
            if frame is None:
                break
            kind, body, _ = frame
            if kind == Kind.NEED_BLOB:
                self.owner.need_blob(self, pickle.loads(body))
            elif kind == Kind.MESSAGE:
                self.relay(proc, body)
            elif kind == Kind.RESULT:
                with self.owner.lock:
                    cancelled = self.cancelling
                    # A slot being killed for a cancel stays out of dispatch until replaced.
                    self.task_id = None if cancelled is None else -1
                busy = time.perf_counter() - self.sent_at
                for task_id, code, payload in pickle.loads(body):
                    if task_id == cancelled:
                        code, payload = Status.CANCELLED, b""
                    agent.finish(task_id, Status(code), payload, busy)
                self.owner.pump()
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


if __name__ == "__main__":
    main()
