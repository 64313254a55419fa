"""Frames: the header, reading and writing them, their kinds, and the limits on reading.

A frame is a fixed header ``magic | protocol | kind | flags | length`` followed by
``length`` bytes of body. Bodies above :data:`COMPRESS_THRESHOLD` bytes are
compressed with ``lz4.frame`` (flag :data:`FLAG_LZ4`) when that makes them smaller.

Reading is bounded: a length above :func:`max_frame_bytes` is refused before
anything is allocated for it, a compressed body must declare its decompressed
size (``lz4.frame`` stores it) within the same limit and may not produce more, and
a stream that ends inside a frame is a :class:`~skyward.errors.ProtocolError`
(only an end exactly between two frames is the clean end of a conversation).
"""

from __future__ import annotations

import os
import pickle
import struct
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import IntEnum
from typing import IO, Any, Final

import lz4.frame

from skyward.errors import ProtocolError

MAGIC = b"SK"
PROTOCOL = 1
HEADER = struct.Struct("!2sBBBQ")
FLAG_LZ4 = 0x01
COMPRESS_THRESHOLD = 64 * 1024
PICKLE_PROTOCOL = 5
MAX_FRAME_ENV = "SKYWARD_MAX_FRAME_BYTES"


class Kind(IntEnum):
    """Frame kinds."""

    HELLO = 1
    TASK = 2
    RESULT = 3
    BLOB = 4
    CANCEL = 5
    HEARTBEAT = 6
    BYE = 7
    NEED_BLOB = 8
    MESSAGE = 9  # a task's message to the client (skyward.agent.emit), and the reply


class Status(IntEnum):
    """How a task ended, as reported in a ``RESULT`` frame."""

    OK = 0
    ERROR = 1
    CANCELLED = 2
    WORKER_DIED = 3


def encode(kind: Kind, body: bytes, compress: bool = True) -> bytes:
    """Return one frame carrying ``body``."""
    flags = 0
    if compress and len(body) > COMPRESS_THRESHOLD:
        packed = lz4.frame.compress(body, compression_level=0)
        if len(packed) < len(body):
            body, flags = packed, FLAG_LZ4
    return HEADER.pack(MAGIC, PROTOCOL, kind, flags, len(body)) + body


def encode_obj(kind: Kind, obj: object) -> bytes:
    """Return one frame whose body is ``obj`` pickled (plain pickle: protocol data only)."""
    return encode(kind, pickle.dumps(obj, protocol=PICKLE_PROTOCOL))


# --- limits ---------------------------------------------------------------------------------

_memory: int | None = None


def max_frame_bytes() -> int:
    """The largest frame body (and decompressed body) this process reads, in bytes.

    ``SKYWARD_MAX_FRAME_BYTES`` when set (read at each frame, so ``Image.env`` sets it
    on an agent too), else this machine's physical memory: a larger frame could not
    be held anyway, and a corrupt length is refused instead of allocated.
    """
    configured = os.environ.get(MAX_FRAME_ENV)
    if configured:
        try:
            value = int(configured)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(
                f"{MAX_FRAME_ENV}={configured!r} is not a positive number of bytes: set it "
                "to the largest frame to accept (e.g. 17179869184 for 16 GiB) or unset it"
            )
        return value
    global _memory
    if _memory is None:
        try:
            _memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, OSError, ValueError):
            _memory = 1 << 40
    return _memory


def _limit_hint(limit: int) -> str:
    return (
        f"the limit of {limit} bytes ({MAX_FRAME_ENV}, by default this machine's memory): "
        f"raise {MAX_FRAME_ENV} on the reading side if such large arguments or results are "
        "expected, otherwise the peer is not a Skyward process of this version"
    )


# --- reading --------------------------------------------------------------------------------


def read_frame(stream: IO[bytes], limit: int | None = None) -> tuple[Kind, bytes, int] | None:
    """Read one frame; return ``(kind, body, wire_size)``, or ``None`` at the end of the
    stream between two frames.

    Raises :class:`~skyward.errors.ProtocolError` for a stream that is not Skyward
    frames, that ends inside a frame, or whose frame is above ``limit`` bytes
    (default :func:`max_frame_bytes`), compressed or not.
    """
    header = _read_exact(stream, HEADER.size, "frame header", at_boundary=True)
    if header is None:
        return None
    if limit is None:
        limit = max_frame_bytes()
    kind, flags, length = _parse_header(header, limit)
    body = _read_exact(stream, length, f"{kind.name} frame of {length} bytes") if length else b""
    assert body is not None
    return kind, _body(kind, flags, body, limit), HEADER.size + length


def _parse_header(header: bytes | bytearray, limit: int) -> tuple[Kind, int, int]:
    """``(kind, flags, length)`` of a frame header, refused when not ours or above ``limit``."""
    magic, protocol, code, flags, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(
            f"unexpected bytes on the agent channel ({bytes(header)!r}): something other than "
            "the Skyward agent wrote to its stdout (a login banner or a shell profile that "
            "prints?)"
        )
    if protocol != PROTOCOL:
        raise ProtocolError(
            f"agent speaks protocol {protocol}, this client speaks {PROTOCOL}: install the same "
            "skyward version on both sides"
        )
    try:
        kind = Kind(code)
    except ValueError:
        raise ProtocolError(f"unknown frame kind {code} (the peer runs another version)") from None
    if length > limit:
        raise ProtocolError(f"a {kind.name} frame of {length} bytes is above {_limit_hint(limit)}")
    return kind, flags, length


def _body(kind: Kind, flags: int, body: bytes, limit: int) -> bytes:
    return _decompress(body, limit, kind) if flags & FLAG_LZ4 else body


Frame = tuple[Kind, bytes, int]
"""A decoded frame: ``(kind, body, wire_size)``."""

LARGE_BODY = 1 << 20
"""A body at least this large is read into its own buffer, not through the parser's."""


class FrameParser:
    """Frames from a byte stream that arrives in pieces (the client's I/O loop).

    Small frames are cut from an accumulation buffer; a body of :data:`LARGE_BODY`
    bytes or more gets its own preallocated ``bytearray``, which the caller fills
    in place (:meth:`target`, :meth:`filled`), so a large frame is never joined from
    chunks. Limits are those of :func:`read_frame`; :meth:`end` raises
    :class:`~skyward.errors.ProtocolError` when the stream stops inside a frame.
    """

    def __init__(self, limit: int | None = None) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._large: bytearray | None = None
        self._got = 0
        self._head: tuple[Kind, int, int] = (Kind.HELLO, 0, 0)

    def target(self) -> memoryview | None:
        """Where the next bytes go when a large body is being read, else ``None``
        (then read a chunk and :meth:`feed` it)."""
        if self._large is None:
            return None
        return memoryview(self._large)[self._got :]

    def filled(self, n: int) -> list[Frame]:
        """``n`` bytes were written into :meth:`target`; the frames now complete."""
        assert self._large is not None
        self._got += n
        if self._got < len(self._large):
            return []
        kind, flags, length = self._head
        body, self._large, self._got = self._large, None, 0
        limit = self._limit if self._limit is not None else max_frame_bytes()
        return [(kind, _body(kind, flags, body, limit), HEADER.size + length)]  # type: ignore[arg-type]

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` (read while :meth:`target` is ``None``); the frames now complete."""
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        while len(buffer) >= HEADER.size:
            limit = self._limit if self._limit is not None else max_frame_bytes()
            kind, flags, length = _parse_header(buffer[: HEADER.size], limit)
            end = HEADER.size + length
            if len(buffer) >= end:
                body = bytes(buffer[HEADER.size : end])
                del buffer[:end]
                frames.append((kind, _body(kind, flags, body, limit), end))
            elif length >= LARGE_BODY:
                self._head = (kind, flags, length)
                self._large = bytearray(length)
                self._got = len(buffer) - HEADER.size
                self._large[: self._got] = buffer[HEADER.size :]
                buffer.clear()
                break
            else:
                break
        return frames

    def end(self) -> None:
        """The stream ended: an error unless that was between two frames."""
        if self._large is not None:
            kind, _, length = self._head
            what, got, n = f"{kind.name} frame of {length} bytes", self._got, length
        elif self._buffer:
            if len(self._buffer) < HEADER.size:
                what, got, n = "frame header", len(self._buffer), HEADER.size
            else:
                kind, _, length = _parse_header(self._buffer[: HEADER.size], 1 << 62)
                what, got, n = f"{kind.name} frame of {length} bytes", len(self._buffer), length
        else:
            return
        raise ProtocolError(
            f"the stream ended inside a {what} ({got} of {n} bytes read): the peer "
            "exited or the connection was cut while it was writing"
        )


def _read_exact(stream: IO[bytes], n: int, what: str, at_boundary: bool = False) -> bytes | None:
    """``n`` bytes; ``None`` only when ``at_boundary`` and the stream ends before the first."""
    data = stream.read(n)
    if len(data) == n:
        return data
    if not data and at_boundary:
        return None
    chunks = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            raise ProtocolError(
                f"the stream ended inside a {what} ({got} of {n} bytes read): the peer "
                "exited or the connection was cut while it was writing"
            )
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _decompress(body: bytes, limit: int, kind: Kind) -> bytes:
    """Decompress an lz4 body, producing at most its declared size (itself within ``limit``)."""
    try:
        size = int(lz4.frame.get_frame_info(body)["content_size"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"a {kind.name} frame's lz4 body is malformed: {exc}") from None
    if size <= 0:
        raise ProtocolError(
            f"a {kind.name} frame's lz4 body does not declare its size (Skyward always does)"
        )
    if size > limit:
        raise ProtocolError(
            f"a {kind.name} frame decompresses to {size} bytes, above {_limit_hint(limit)}"
        )
    decompressor = lz4.frame.LZ4FrameDecompressor()
    try:
        data = decompressor.decompress(body, max_length=size)
    except RuntimeError as exc:
        raise ProtocolError(f"a {kind.name} frame's lz4 body is corrupt: {exc}") from None
    if len(data) != size or not decompressor.eof or decompressor.unused_data:
        raise ProtocolError(
            f"a {kind.name} frame's lz4 body does not match its declared size of {size} bytes"
        )
    return data


# --- dispatch -------------------------------------------------------------------------------

STOP: Final = object()
"""What a :class:`Dispatch` handler returns to end the reading loop."""

Handler = Callable[[bytes], object]


class Dispatch:
    """One reader's table from frame kind to handler, and the loop that applies it.

    Each reader of frames (the agent's main loop, a process slot's reader, the
    client's node reader) registers a handler per kind it expects; a frame of any
    other kind is a :class:`~skyward.errors.ProtocolError`. A handler receives the
    frame's body; it returns :data:`STOP` to end the loop.

    Args:
        handlers: the handler for each expected kind.
        on_frame: called with each frame's size on the wire before its handler runs.
    """

    def __init__(
        self, handlers: Mapping[Kind, Handler], on_frame: Callable[[int], object] | None = None
    ) -> None:
        self.handlers = dict(handlers)
        self.on_frame = on_frame

    def run(self, stream: IO[bytes], limit: int | None = None) -> bool:
        """Handle frames from ``stream`` until it ends (return ``True``) or a handler
        returns :data:`STOP` (return ``False``); errors propagate."""
        while True:
            frame = read_frame(stream, limit)
            if frame is None:
                return True
            if self.handle(*frame):
                return False

    def handle(self, kind: Kind, body: bytes, size: int) -> bool:
        """Apply the handler for one frame; whether it asked to stop."""
        if self.on_frame is not None:
            self.on_frame(size)
        handler = self.handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unexpected {kind.name} frame from the peer")
        return handler(body) is STOP


# --- writing --------------------------------------------------------------------------------


IOV_MAX = 512
"""Buffers per ``os.writev`` call (POSIX guarantees at least 16, Linux takes 1024)."""


def as_views(frame: bytes | Sequence[bytes | memoryview]) -> list[memoryview]:
    """A frame (or several) given whole or as a list of buffers, as flat byte views."""
    parts = [frame] if isinstance(frame, bytes) else frame
    views = [memoryview(b) for b in parts]
    return [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in views]


def consume(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes written from ``views`` (in place)."""
    while n:
        first = views[0]
        if n >= len(first):
            n -= len(first)
            del views[0]
        else:
            views[0] = first[n:]
            n = 0


def write_views(stream: IO[bytes], views: list[memoryview]) -> int:
    """Write ``views`` to ``stream`` without joining them (``os.writev`` on its descriptor,
    else one ``write`` each); the bytes written."""
    total = sum(len(v) for v in views)
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0:
        for view in views:
            stream.write(view)
        stream.flush()
        return total
    stream.flush()  # anything written through the stream's own buffer goes first
    views = list(views)
    while views:
        consume(views, os.writev(fd, views[:IOV_MAX]))
    return total


class Outbox:
    """Frames queued for the peer; one writer thread coalesces them into few writes.

    Items queued with :meth:`put_item` are gathered per kind into one list-bodied
    frame per write, after the raw frames queued before them: many small tasks
    or results cost one frame, one pickle and one syscall. Buffers are written as
    they are (``os.writev``), never joined: a result's large buffers are not copied.
    """

    def __init__(
        self, stream: IO[bytes], on_broken: Callable[[], object], name: str = "skyward-outbox"
    ) -> None:
        self._stream = stream
        self._frames: deque[list[memoryview]] = deque()
        self._items: dict[Kind, list[Any]] = {}
        self._ready = threading.Condition()
        self._on_broken = on_broken
        self.sent = 0
        self._writing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, frame: bytes | Sequence[bytes | memoryview], urgent: bool = False) -> None:
        """Queue one frame (or several, concatenated), given whole or as a list of buffers;
        ``urgent`` is accepted for the I/O loop's writers' sake (here frames keep their order)."""
        views = as_views(frame)
        with self._ready:
            if self._closed:
                return
            self._frames.append(views)
            self._ready.notify()

    def put_item(self, kind: Kind, item: object) -> None:
        """Queue one item of a list-bodied frame (``TASK`` or ``RESULT``)."""
        with self._ready:
            if self._closed:
                return
            self._items.setdefault(kind, []).append(item)
            self._ready.notify()

    @property
    def pending(self) -> bool:
        """Whether frames are queued or being written."""
        return bool(self._frames) or bool(self._items) or self._writing

    def close(self) -> None:
        """Stop writing; frames not yet written are dropped."""
        with self._ready:
            self._closed = True
            self._frames.clear()
            self._items.clear()
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._frames and not self._items and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                batch = [view for frame in self._frames for view in frame]
                self._frames.clear()
                items, self._items = self._items, {}
                self._writing = True
            batch.extend(memoryview(encode_obj(kind, values)) for kind, values in items.items())
            try:
                self.sent += write_views(self._stream, batch)
                self._writing = False
            except (OSError, ValueError):
                self._on_broken()
                return
