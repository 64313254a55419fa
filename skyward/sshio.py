"""An SSH exec channel served by the one I/O loop (:mod:`skyward.io`), like a local pipe.

paramiko's ``Channel.fileno()`` is a pipe that is readable while stdout or stderr data
is buffered (and for good once the channel ends), so the loop waits on it with every
other channel and drains both buffers without blocking. paramiko offers no fd that
says when a channel may be written again: a full window (or a socket the kernel
will not take more from) is retried on a short loop timer instead. No thread of its
own per node; paramiko's transport thread per connection does the network.
"""

from __future__ import annotations

import select
import selectors
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from skyward import io as skyio
from skyward import wire

if TYPE_CHECKING:
    import paramiko

    from skyward.io import IOLoop

_CHUNK = 1 << 18
RETRY = 0.002
"""Seconds before a writer that found no room (window, socket, key exchange) tries again;
doubled while there is still none, up to :data:`MAX_RETRY`."""
MAX_RETRY = 0.05
UNCHECKED = 1 << 18
"""Bytes sent before the socket is polled again for room: polling before every small
packet would add a syscall per task, and a socket short of room only for what was
sent since its last poll can block the loop for one packet at most."""


class ChannelReader:
    """An exec channel's stdout (frames) and stderr (lines), read on the loop.

    Stderr is read from the start (the agent announces itself there); frames that
    arrive before :meth:`attach` are kept for it. ``on_stderr_end`` is called once when
    the stream ends.
    """

    def __init__(
        self,
        channel: paramiko.Channel,
        on_line: Callable[[bytes], object],
        on_stderr_end: Callable[[], object],
    ) -> None:
        self._channel = channel
        self.fd = channel.fileno()
        self._parser = wire.FrameParser()
        self._lines = skyio.LineSplitter(on_line)
        self._on_stderr_end = on_stderr_end
        self._on_frame: Callable[[wire.Kind, bytes, int], object] | None = None
        self._on_end: Callable[[str], object] | None = None
        self._early: list[wire.Frame] = []
        self._reason: str | None = None
        self.done = threading.Event()
        self._detached = False
        skyio.loop().call(lambda: skyio.loop().watch(self.fd, selectors.EVENT_READ, self._ready))

    def attach(
        self,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        """Hand frames (those already read first) to ``on_frame``; ``on_end(reason)`` once."""

        def attach() -> None:
            self._on_frame, self._on_end = on_frame, on_end
            early, self._early = self._early, []
            for frame in early:
                if not self._detached:
                    on_frame(*frame)
            if self._reason is not None and not self._detached:
                on_end(self._reason)

        skyio.loop().call(attach)

    def _ready(self, mask: int) -> None:
        channel = self._channel
        try:
            ended = channel.eof_received or channel.closed  # all data is buffered before
            if channel.recv_stderr_ready():
                self._lines.feed(channel.recv_stderr(_CHUNK))
            if channel.recv_ready():
                self._frames(self._read(channel))
            # What is left (or came since) keeps the pipe readable: the loop comes back.
            if ended and not (channel.recv_ready() or channel.recv_stderr_ready()):
                self._parser.end()
                self._finish("its channel closed (agent process exited or connection lost)")
        except Exception as exc:  # noqa: BLE001
            self._finish(f"reading from it failed: {type(exc).__name__}: {exc}")

    def _read(self, channel: paramiko.Channel) -> list[wire.Frame]:
        target = self._parser.target()
        if target is None:
            return self._parser.feed(channel.recv(_CHUNK))
        data = channel.recv(min(len(target), _CHUNK))  # paramiko returns bytes: one copy
        target[: len(data)] = data
        return self._parser.filled(len(data))

    def _frames(self, frames: list[wire.Frame]) -> None:
        for frame in frames:
            if self._detached:
                return
            if self._on_frame is None:
                self._early.append(frame)
            else:
                self._on_frame(*frame)

    def _finish(self, reason: str) -> None:
        skyio.loop().unwatch(self.fd)
        if self.done.is_set():
            return
        self._lines.end()
        self.done.set()
        self._on_stderr_end()
        if self._on_end is None:
            self._reason = reason
        elif not self._detached:
            self._on_end(reason)

    def detach(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the end of the stream (the agent's last stderr
        lines), then stop reading (before the channel closes its pipe); ``on_end`` is not
        called after this."""
        self.done.wait(timeout)
        self._detached = True
        skyio.loop().run(lambda: skyio.loop().unwatch(self.fd))


class ChannelWriter(skyio.LoopWriter):
    """A :class:`~skyward.io.LoopWriter` for an SSH channel's stdin.

    Each ``send`` is one SSH packet: small frames are joined up to a packet's size,
    large buffers are sent as slices of themselves. A send happens only when it
    cannot block the loop: the window has room, no key exchange is under way, and
    the connection's socket is writable; otherwise it is retried :data:`RETRY` later.
    """

    def __init__(self, channel: paramiko.Channel, on_broken: Callable[[], object]) -> None:
        super().__init__(on_broken)
        self._channel = channel
        self._scheduled = False
        self._delay = RETRY
        self._unchecked = 0
        transport = channel.get_transport()
        self._transport = transport
        self._poll: select.poll | None = None
        self._outer: paramiko.Channel | None = None
        sock = getattr(transport, "sock", None)
        if isinstance(sock, socket.socket):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLOUT)
        elif hasattr(sock, "send_ready"):  # through a jump host: the jump connection's channel
            self._outer = sock

    arm_on_caller = True  # paramiko's send is thread-safe, and never waits here for room

    def _arm(self) -> None:
        self._drain()

    def _idle(self) -> None:
        pass  # nothing to unwatch: timers find the writer closed or idle

    def _later(self, loop: IOLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(self._delay, self._retry)
            self._delay = min(self._delay * 2, MAX_RETRY)

    def _retry(self) -> None:
        self._scheduled = False
        self._drain()

    def _room(self) -> bool:
        """Whether a packet can be sent without waiting."""
        transport = self._transport
        if transport is not None and not transport.clear_to_send.is_set():
            return False  # key exchange: paramiko would wait for it
        if not self._channel.send_ready():
            return False
        if self._outer is not None and not self._outer.send_ready():
            return False
        if self._poll is None or self._unchecked < UNCHECKED:
            return True
        if not self._poll.poll(0):
            return False
        self._unchecked = 0
        return True

    def _packet(self) -> bytes | memoryview:
        size = max(1024, self._channel.out_max_packet_size - 64)
        first = self._current[0]
        if len(first) >= size or len(self._current) == 1:
            return first[:size]
        parts: list[memoryview] = []
        left = size
        for view in self._current:
            parts.append(view[:left])
            left -= len(parts[-1])
            if not left:
                break
        return b"".join(parts)

    def _drain(self) -> None:
        loop = skyio.loop()
        budget = 1 << 20  # then let the loop serve the other channels
        while self._take():
            if not self._room():
                if self._channel.closed:
                    self._broken()
                else:
                    self._later(loop)
                return
            try:
                # paramiko copies what it is given into the packet; a view is fine.
                n = self._channel.send(self._packet())  # type: ignore[arg-type]
            except TimeoutError:
                self._later(loop)
                return
            except Exception:  # noqa: BLE001 - closed, connection lost (OSError, EOFError, SSHException)
                self._broken()
                return
            if n <= 0:  # the channel closed or sent EOF
                self._broken()
                return
            self._wrote(n)
            self._delay = RETRY
            self._unchecked += n
            budget -= n
            if budget <= 0:
                loop.call(self._drain)
                return
