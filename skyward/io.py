"""The one I/O loop that serves them all.

One thread per client process multiplexes every channel with :mod:`selectors`
(local agents' pipes here, SSH channels through :mod:`skyward.sshio`): frames read
from stdout are cut by a :class:`~skyward.wire.FrameParser` and handed to the node's
handlers, stderr is forwarded line by line, and queued frames are written to stdin
when it is writable (or, where no descriptor says so, retried on a loop timer). The
number of client threads therefore does not grow with the number of nodes. Handlers
run on this thread: they only do bookkeeping (results reach user code through the
scheduler's result thread).
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from skyward import wire
from skyward.wire.frames import IOV_MAX, as_views, consume

_CHUNK = 1 << 18
_BATCH_BYTES = 1 << 20

Buffers = Sequence[bytes | memoryview]


class FrameSink(Protocol):
    """Where a node's frames are queued: a :class:`LoopWriter`."""

    sent: int

    def put(self, frame: bytes | Buffers, urgent: bool = False) -> None: ...

    @property
    def pending(self) -> bool: ...

    def close(self) -> None: ...


class IOLoop:
    """A selector and the thread that serves it; callbacks run on that thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], object]] = deque()
        self._timers: list[tuple[float, int, Callable[[], object]]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def on_loop(self) -> bool:
        """Whether the caller is the loop's thread."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop's thread, soon."""
        self._add(lambda: self._calls.append(fn))

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the loop's thread in ``delay`` seconds (for what offers no fd to
        wait on, such as a full SSH window)."""
        entry = (time.monotonic() + delay, next(self._order), fn)
        self._add(lambda: heapq.heappush(self._timers, entry))

    def _add(self, add: Callable[[], object]) -> None:
        with self._lock:
            add()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="skyward-io", daemon=True)
                self._thread.start()
        if self.on_loop:
            return  # the loop looks at its calls and timers before it waits again
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # already woken

    def run(self, fn: Callable[[], object], timeout: float = 5.0) -> None:
        """Run ``fn`` on the loop's thread and wait (bounded) until it has run."""
        if self.on_loop:
            fn()
            return
        done = threading.Event()

        def call() -> None:
            try:
                fn()
            finally:
                done.set()

        self.call(call)
        done.wait(timeout)

    def watch(self, fd: int, events: int, callback: Callable[[int], object]) -> None:
        """(Loop thread.) Call ``callback(mask)`` when ``fd`` is ready for ``events``."""
        try:
            self._selector.register(fd, events, callback)
        except KeyError:
            self._selector.modify(fd, events, callback)

    def unwatch(self, fd: int) -> None:
        """(Loop thread.) Stop watching ``fd`` (before it is closed)."""
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _timeout(self) -> float | None:
        with self._lock:
            if self._calls:
                return 0.0
            if not self._timers:
                return None
            return max(0.0, self._timers[0][0] - time.monotonic())

    def _due(self) -> list[Callable[[], object]]:
        """The calls queued and the timers due now (not those they add: fds come first)."""
        with self._lock:
            due = list(self._calls)
            self._calls.clear()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
            return due

    def _run(self) -> None:
        while True:
            for key, mask in self._selector.select(self._timeout()):
                if key.data is None:
                    try:
                        while os.read(self._wake_read, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                try:
                    key.data(mask)
                except Exception:  # noqa: BLE001 - one channel's failure must not stop the rest
                    self.unwatch(key.fd)
            for fn in self._due():
                try:
                    fn()
                except Exception:  # noqa: BLE001, S110 - callers report their own errors
                    pass


_loop: IOLoop | None = None
_loop_lock = threading.Lock()


def loop() -> IOLoop:
    """This process's I/O loop (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = IOLoop()
        return _loop


def _forget_loop() -> None:
    global _loop
    _loop = None  # a forked child has no loop thread: it starts its own when needed


os.register_at_fork(after_in_child=_forget_loop)


class FrameReader:
    """Reads frames from a pipe on the loop and hands them on; ``on_end(reason)`` once."""

    def __init__(
        self,
        fd: int,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        self.fd = fd
        self._on_frame = on_frame
        self._on_end = on_end
        self._parser = wire.FrameParser()
        self.done = threading.Event()
        loop().call(lambda: loop().watch(fd, selectors.EVENT_READ, self._readable))

    def _readable(self, mask: int) -> None:
        try:
            target = self._parser.target()
            if target is not None:
                n = os.readv(self.fd, [target])
                frames = self._parser.filled(n) if n else None
            else:
                data = os.read(self.fd, _CHUNK)
                frames = self._parser.feed(data) if data else None
            if frames is None:
                self._parser.end()
                self._finish("its channel closed (agent process exited or connection lost)")
                return
            for frame in frames:
                if self.done.is_set():
                    return
                self._on_frame(*frame)
        except Exception as exc:  # noqa: BLE001
            self._finish(f"reading from it failed: {type(exc).__name__}: {exc}")

    def _finish(self, reason: str) -> None:
        loop().unwatch(self.fd)
        if not self.done.is_set():
            self.done.set()
            self._on_end(reason)

    def detach(self) -> None:
        """Stop reading (before the pipe is closed); ``on_end`` is not called."""
        self.done.set()
        loop().run(lambda: loop().unwatch(self.fd))


class LineSplitter:
    """Cuts a byte stream that arrives in pieces into lines for ``on_line``."""

    def __init__(self, on_line: Callable[[bytes], object]) -> None:
        self._on_line = on_line
        self._partial = b""

    def feed(self, data: bytes) -> None:
        """Hand on every line ``data`` completes (each with its ``\\n``)."""
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self._on_line(line + b"\n")

    def end(self) -> None:
        """The stream ended: hand on the unterminated last part, if any."""
        if self._partial:
            self._on_line(self._partial)
        self._partial = b""


class LineReader:
    """Reads a pipe on the loop and calls ``on_line`` with each line (and the last part)."""

    def __init__(self, fd: int, on_line: Callable[[bytes], object]) -> None:
        self.fd = fd
        self._lines = LineSplitter(on_line)
        self.done = threading.Event()
        loop().call(lambda: loop().watch(fd, selectors.EVENT_READ, self._readable))

    def _readable(self, mask: int) -> None:
        try:
            data = os.read(self.fd, _CHUNK)
        except OSError:
            data = b""
        if not data:
            self._lines.end()
            loop().unwatch(self.fd)
            self.done.set()
            return
        self._lines.feed(data)

    def detach(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the end of the stream, then stop reading."""
        self.done.wait(timeout)
        loop().run(lambda: loop().unwatch(self.fd))


class LoopWriter(ABC):
    """Frames queued for one channel, written on the loop without joining their buffers.

    ``urgent`` frames (heartbeats) go before queued ones at the next frame boundary,
    so they do not wait behind a large blob. Subclasses write and say how to wait for
    room (:meth:`_arm`) and what to do when idle (:meth:`_idle`).
    """

    arm_on_caller = False
    """Whether :meth:`_arm` may run on the thread that queued the frames (it writes from
    there: a busy caller holds the GIL the loop's thread would need after each write)."""

    def __init__(self, on_broken: Callable[[], object]) -> None:
        self._on_broken = on_broken
        self._frames: deque[list[memoryview]] = deque()
        self._urgent: deque[list[memoryview]] = deque()
        self._current: list[memoryview] = []
        self._lock = threading.Lock()
        self._armed = False
        self._closed = False
        self.sent = 0

    def put(self, frame: bytes | Buffers, urgent: bool = False) -> None:
        """Queue one frame (or several), given whole or as a list of buffers."""
        buffers = as_views(frame)
        with self._lock:
            if self._closed:
                return
            (self._urgent if urgent else self._frames).append(buffers)
            if self._armed:
                return
            self._armed = True
        if self.arm_on_caller:
            self._arm()
        else:
            loop().call(self._arm)

    @property
    def pending(self) -> bool:
        """Whether frames are queued or being written."""
        return self._armed

    def close(self) -> None:
        """Stop writing; frames not yet written are dropped."""
        with self._lock:
            self._closed = True
            self._frames.clear()
            self._urgent.clear()
        loop().run(self._idle)

    @abstractmethod
    def _arm(self) -> None:
        """(Loop thread, or the caller's with :attr:`arm_on_caller`.) Frames were queued:
        write what can be, wait for room for the rest."""

    @abstractmethod
    def _idle(self) -> None:
        """(Loop thread.) Nothing left to write: stop waiting for room."""

    def _take(self) -> bool:
        """Move frames into the batch being written; whether there is anything to write."""
        with self._lock:
            if self._closed:
                return False
            size = sum(len(b) for b in self._current)
            while (self._urgent or self._frames) and len(self._current) < IOV_MAX:
                if size >= _BATCH_BYTES and self._current:
                    break
                frame = (self._urgent or self._frames).popleft()
                self._current.extend(frame)
                size += sum(len(b) for b in frame)
            if not self._current:
                self._armed = False
                self._idle()
                return False
            return True

    def _wrote(self, n: int) -> None:
        self.sent += n
        consume(self._current, n)

    def _broken(self) -> None:
        with self._lock:
            self._closed = True
            self._armed = False
            self._frames.clear()
            self._urgent.clear()
            self._current.clear()
        self._idle()
        self._on_broken()


class PipeWriter(LoopWriter):
    """A :class:`LoopWriter` for a pipe: ``os.writev`` when the selector says it is writable."""

    def __init__(self, fd: int, on_broken: Callable[[], object]) -> None:
        super().__init__(on_broken)
        self.fd = fd
        os.set_blocking(fd, False)

    def put(self, frame: bytes | Buffers, urgent: bool = False) -> None:
        """Queue one frame (or several); with nothing queued, write what the pipe takes now.

        Writing from the caller's thread matters: a caller busy submitting holds the
        GIL, and the loop's thread, which needs it back after every system call, would
        then write one frame per switch interval (5 ms) while the nodes sit idle.
        """
        buffers = as_views(frame)
        with self._lock:
            if self._closed:
                return
            if self._armed or self._current:
                (self._urgent if urgent else self._frames).append(buffers)
                return
            try:
                n = os.writev(self.fd, buffers[:IOV_MAX])
            except BlockingIOError:
                n = 0
            except OSError:
                n = -1
            if n >= 0:
                self.sent += n
                consume(buffers, n)
                if not buffers:
                    return
                self._current = buffers  # the rest of a frame begun: it goes first
                self._armed = True
        if n < 0:
            self._broken()
        else:
            loop().call(self._arm)

    def _arm(self) -> None:
        if not self._closed:
            loop().watch(self.fd, selectors.EVENT_WRITE, self._writable)
            self._writable(selectors.EVENT_WRITE)

    def _idle(self) -> None:
        loop().unwatch(self.fd)

    def _writable(self, mask: int) -> None:
        while self._take():
            try:
                n = os.writev(self.fd, self._current[:IOV_MAX])
            except BlockingIOError:
                return
            except OSError:
                self._broken()
                return
            self._wrote(n)
