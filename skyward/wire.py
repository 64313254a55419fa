"""The frame protocol spoken between the client and an agent over any byte stream.

A frame is a fixed header ``magic | protocol | kind | flags | length`` followed
by a body. Bodies above :data:`COMPRESS_THRESHOLD` bytes are compressed with
``lz4.frame`` (flag :data:`FLAG_LZ4`) when that makes them smaller.

Task payloads are cloudpickled. Large arguments (numpy arrays, bytes, pandas
objects above :data:`BLOB_THRESHOLD`) and functions pickled by value become
*blobs*: serialized once, keyed by a content hash and referenced from the task
(a reduce to :func:`_blob`, or a persistent id for large ``bytes``), so each is
sent to a node once.
Medium arrays (above :data:`REUSE_THRESHOLD`) become blobs once the same object
is sent again with unchanged content, so repeated ``y`` and index arrays are not
re-sent either.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import platform
import struct
import sys
import threading
import traceback
import types
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from typing import IO, Any

import cloudpickle
import lz4.frame

MAGIC = b"SK"
PROTOCOL = 1
HEADER = struct.Struct("!2sBBBQ")
FLAG_LZ4 = 0x01
COMPRESS_THRESHOLD = 64 * 1024
BLOB_THRESHOLD = 1024 * 1024
REUSE_THRESHOLD = 16 * 1024
PICKLE_PROTOCOL = 5


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


class ProtocolError(RuntimeError):
    """The byte stream does not carry Skyward frames (wrong peer, or output on stdout)."""


class RemoteError(Exception):
    """A task failed with an exception that could not be recreated on the client."""


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


def read_frame(stream: IO[bytes]) -> tuple[Kind, bytes, int] | None:
    """Read one frame; return ``(kind, body, wire_size)`` or ``None`` at end of stream."""
    header = _read_exact(stream, HEADER.size)
    if header is None:
        return None
    magic, protocol, kind, flags, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(
            f"unexpected bytes on the agent channel ({header!r}): something other than the "
            "Skyward agent wrote to its stdout (a login banner or a shell profile that prints?)"
        )
    if protocol != PROTOCOL:
        raise ProtocolError(
            f"agent speaks protocol {protocol}, this client speaks {PROTOCOL}: install the same "
            "skyward version on both sides"
        )
    body = _read_exact(stream, length) if length else b""
    if body is None:
        return None
    size = HEADER.size + length
    if flags & FLAG_LZ4:
        body = lz4.frame.decompress(body)
    return Kind(kind), body, size


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    if not data:
        return None
    if len(data) == n:
        return data
    chunks = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            return None
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


class Outbox:
    """Frames queued for the peer; one writer thread coalesces them into few writes.

    Items queued with :meth:`put_item` are gathered per kind into one list-bodied
    frame per write, after the raw frames queued before them: many small tasks
    or results cost one frame, one pickle and one syscall.
    """

    def __init__(
        self, stream: IO[bytes], on_broken: Callable[[], object], name: str = "skyward-outbox"
    ) -> None:
        self._stream = stream
        self._frames: deque[bytes] = deque()
        self._items: dict[Kind, list[Any]] = {}
        self._ready = threading.Condition()
        self._on_broken = on_broken
        self.sent = 0
        self._writing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> None:
        """Queue one frame (or several, concatenated)."""
        with self._ready:
            if self._closed:
                return
            self._frames.append(frame)
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
                batch = list(self._frames)
                self._frames.clear()
                items, self._items = self._items, {}
                self._writing = True
            batch.extend(encode_obj(kind, values) for kind, values in items.items())
            data = b"".join(batch)
            try:
                self._stream.write(data)
                self._stream.flush()
                self.sent += len(data)
                self._writing = False
            except (OSError, ValueError):
                self._on_broken()
                return


# --- versions -----------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    """What this side runs, exchanged in ``HELLO`` frames."""
    from skyward import __version__

    info: dict[str, Any] = {
        "protocol": PROTOCOL,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "skyward": __version__,
        "cloudpickle": cloudpickle.__version__,
    }
    joblib = sys.modules.get("joblib")
    info["joblib"] = getattr(joblib, "__version__", None)
    return info


class VersionMismatchError(RuntimeError):
    """Client and agent run versions that cannot exchange pickled tasks."""


def check_compatible(local: dict[str, Any], remote: dict[str, Any], node: str) -> None:
    """Raise :class:`VersionMismatchError` when ``remote`` cannot unpickle what we send."""
    problems = []
    if remote.get("protocol") != local["protocol"]:
        problems.append(f"protocol {remote.get('protocol')} vs {local['protocol']}")
    lpy = ".".join(str(local["python"]).split(".")[:2])
    rpy = ".".join(str(remote.get("python", "?")).split(".")[:2])
    if lpy != rpy or remote.get("implementation") != local["implementation"]:
        problems.append(
            f"Python {remote.get('implementation')} {remote.get('python')} on the worker vs "
            f"{local['implementation']} {local['python']} on the client"
        )
    lcp = str(local["cloudpickle"]).split(".")[0]
    rcp = str(remote.get("cloudpickle", "?")).split(".")[0]
    if lcp != rcp:
        problems.append(f"cloudpickle {remote.get('cloudpickle')} vs {local['cloudpickle']}")
    if problems:
        raise VersionMismatchError(
            f"{node} cannot run tasks pickled by this client: {'; '.join(problems)}. "
            f"Use the same Python minor version on both sides (Image(python='{lpy}') or "
            "Local(python=...)) and the same cloudpickle major version"
        )


# --- blobs and task payloads ----------------------------------------------------------------


def _nbytes(obj: object) -> int:
    """The in-memory size of an object of a blob-able type (arrays, bytes, frames), else 0."""
    cls = type(obj)
    if cls is bytes or cls is bytearray:
        return len(obj)  # type: ignore[arg-type]
    module = cls.__module__
    if module == "numpy":
        return int(obj.nbytes) if cls.__name__ == "ndarray" else 0  # type: ignore[attr-defined]
    if module.startswith("pandas.core.") and cls.__name__ in ("DataFrame", "Series"):
        try:
            usage = obj.memory_usage(deep=False, index=True)  # type: ignore[attr-defined]
            return int(getattr(usage, "sum", lambda: usage)())
        except Exception:
            return 0
    if module.startswith("scipy.sparse"):
        data = getattr(obj, "data", None)
        return int(getattr(data, "nbytes", 0))
    return 0


def _by_value(obj: object) -> bool:
    """Functions cloudpickle ships by value (defined in ``__main__``, lambdas, closures)."""
    if type(obj) is not types.FunctionType:
        return False
    by_reference = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
    if by_reference is None:
        return obj.__module__ == "__main__"
    try:
        return not by_reference(obj)
    except Exception:
        return False


@dataclass
class Blob:
    """A serialized large object, identified by the hash of its bytes.

    It is framed once, at creation, and the same frame goes to every node.
    """

    key: str
    size: int  # bytes of the serialized object
    frame: bytes  # the BLOB frame carrying it

    @classmethod
    def of(cls, key: str, data: bytes) -> Blob:
        """Frame ``data`` (the object serialized) as blob ``key``."""
        if _compressible(data):
            body = pickle.dumps((key, data), protocol=PICKLE_PROTOCOL)
            return cls(key, len(data), encode(Kind.BLOB, body))
        # Pickled straight behind the header: one copy of a large blob instead of two.
        buffer = io.BytesIO()
        buffer.write(bytes(HEADER.size))
        pickle.dump((key, data), buffer, protocol=PICKLE_PROTOCOL)
        with buffer.getbuffer() as view:
            length = len(view) - HEADER.size
            view[: HEADER.size] = HEADER.pack(MAGIC, PROTOCOL, Kind.BLOB, 0, length)
        return cls(key, len(data), buffer.getvalue())


def _compressible(data: bytes, sample: int = 64 * 1024) -> bool:
    """Whether lz4 is worth trying on all of ``data``, judged on three samples of it.

    Float features rarely compress; skipping the attempt saves ~1.5 ms per MB.
    """
    if len(data) <= 4 * sample:
        return True
    view = memoryview(data)
    middle = len(data) // 2
    parts = (view[:sample], view[middle : middle + sample], view[-sample:])
    packed = sum(len(lz4.frame.compress(part, compression_level=0)) for part in parts)
    return packed < 0.9 * len(parts) * sample


class BlobRegistry:
    """Client-side: serialize each large object once and remember it by identity and content.

    Objects that support weak references (arrays, functions) are remembered until
    they are garbage collected; others (bytes) are kept for the registry's life.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, tuple[Any, str]] = {}
        self._blobs: dict[str, Blob] = {}

    def key_for(self, obj: object) -> str | None:
        """Return the blob key for ``obj`` if it should travel as a blob, else ``None``."""
        if _by_value(obj):
            # Pickled anew each time: a function's globals may have changed since the
            # last call. Equal bytes still travel to each node once.
            return self._store(cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL))
        size = _nbytes(obj)
        if size < REUSE_THRESHOLD:
            return None
        entry = self._by_id.get(id(obj))
        seen = (
            entry is not None
            and (entry[0]() if isinstance(entry[0], weakref.ref) else entry[0]) is obj
        )
        if size < BLOB_THRESHOLD:
            return self._medium(obj, entry[1] if seen and entry is not None else None)
        if seen and entry is not None and entry[1]:
            return entry[1]
        key = self._store(cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL))
        self._remember(obj, key, strong=True)
        return key

    def _medium(self, obj: object, previous: str | None) -> str | None:
        """Inline, until the same object is sent again with the same content: then a blob.

        scikit-learn's ``y`` and CV index arrays go with every fit and become blobs; a
        buffer refilled in place between sends keeps travelling inline. Medium objects
        are hashed on every send after the first (about 1 ms per MB), never stale.
        """
        if previous is None:
            self._remember(obj, "", strong=False)
            return None
        data = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key != previous:
            self._remember(obj, key, strong=False)
            return None
        return self._store(data, key)

    def _remember(self, obj: object, key: str, strong: bool) -> None:
        """Map ``obj``'s identity to ``key`` while it lives (for ever if ``strong`` and it
        cannot be weakly referenced, like ``bytes``)."""
        ident = id(obj)
        ref: Any
        try:
            ref = weakref.ref(obj, partial(self._forget, ident))
        except TypeError:
            if not strong:
                return
            ref = obj
        with self._lock:
            self._by_id[ident] = (ref, key)

    def _store(self, data: bytes, key: str | None = None) -> str:
        """Keep ``data`` under its content hash (``key`` when already computed); return it."""
        if key is None:
            key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key not in self._blobs:
            blob = Blob.of(key, data)
            with self._lock:
                self._blobs.setdefault(key, blob)
        return key

    def _forget(self, ident: int, ref: weakref.ref[Any]) -> None:
        with self._lock:
            entry = self._by_id.get(ident)
            if entry is not None and entry[0] is ref:
                del self._by_id[ident]

    def get(self, key: str) -> Blob:
        """The blob for ``key`` (it stays available while this registry lives)."""
        return self._blobs[key]

    def clear(self) -> None:
        """Forget every blob."""
        with self._lock:
            self._by_id.clear()
            self._blobs.clear()


class _TaskPickler(cloudpickle.Pickler):
    """cloudpickle, with blob-worthy objects replaced by a reference to their blob.

    The reference is a reduce ``(_blob, (key,))``: pickle consults ``reducer_override``
    only for objects it has no built-in fast path for (functions, arrays, frames...),
    and memoizes the result, so plain data pickles at C speed and an object named
    10**5 times in a batch is looked at once.
    """

    def __init__(self, file: IO[bytes], registry: BlobRegistry) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._registry = registry
        self.keys: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        key = self._registry.key_for(obj)
        if key is None:
            return super().reducer_override(obj)
        self.keys.append(key)
        return _blob, (key,)


class _LargeTaskPickler(_TaskPickler):
    """For payloads that came out large: also ``bytes``/``bytearray`` become blobs (pickle
    saves those through fast paths that ``reducer_override`` never sees)."""

    def persistent_id(self, obj: object) -> str | None:
        if type(obj) not in (bytes, bytearray) or len(obj) < BLOB_THRESHOLD:  # type: ignore[arg-type]
            return None
        key = self._registry.key_for(obj)
        if key is not None:
            self.keys.append(key)
        return key


class UnpicklableTaskError(TypeError):
    """A task (function or argument) cannot be serialized for the cluster."""


def dumps_task(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], registry: BlobRegistry
) -> tuple[bytes, tuple[str, ...]]:
    """Serialize a call; return the payload and the blob keys it references."""
    try:
        buffer = io.BytesIO()
        pickler = _TaskPickler(buffer, registry)
        pickler.dump((fn, args, kwargs))
        if buffer.tell() >= BLOB_THRESHOLD:
            buffer = io.BytesIO()
            pickler = _LargeTaskPickler(buffer, registry)
            pickler.dump((fn, args, kwargs))
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise UnpicklableTaskError(
            f"cannot send task {name} to the cluster: {type(exc).__name__}: {exc}. Tasks and "
            "their arguments must be picklable by cloudpickle: avoid locks, open files, "
            "sockets and generators in arguments, or create them inside the task"
        ) from exc
    return buffer.getvalue(), tuple(dict.fromkeys(pickler.keys))


class MissingBlobError(LookupError):
    """A task references a blob the agent does not hold."""


# Unpickling imports modules. Two threads importing one package (numpy) for the first
# time at once can see it half-initialized ("partially initialized module"), so the
# agent's threads unpickle one at a time.
_unpickling = threading.RLock()


@dataclass
class UnloadableBlob:
    """A blob the agent could not unpickle on arrival; tasks using it retry and report why."""

    data: bytes


def loads_blob(data: bytes) -> Any:
    """Deserialize a blob; on failure keep its bytes so each task using it reports the error."""
    try:
        with _unpickling:
            return pickle.loads(data)
    except Exception:
        return UnloadableBlob(data)


_loading: dict[str, Any] = {}  # the blobs of the payload being unpickled (under _unpickling)


def _blob(key: str) -> Any:
    """Resolve a blob reference while a task payload is unpickled (see :func:`loads_task`)."""
    try:
        value = _loading[key]
    except KeyError:
        raise MissingBlobError(key) from None
    if isinstance(value, UnloadableBlob):
        return pickle.loads(value.data)
    return value


class _TaskUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return _blob(pid)


def loads_task(payload: bytes, blobs: dict[str, Any]) -> Any:
    """Deserialize a task payload, resolving blob references from ``blobs``."""
    global _loading
    with _unpickling:
        _loading = blobs
        try:
            return _TaskUnpickler(io.BytesIO(payload)).load()
        finally:
            _loading = {}


def dumps_result(value: object) -> bytes:
    """Serialize a task's return value.

    Plain pickle first: results are mostly data, and the C pickler is several times
    faster on a batch's list of them. What it cannot name by reference (an instance
    of a class the task defined) it refuses, and cloudpickle takes over.
    """
    try:
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception:
        return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)


def dumps_error(exc: BaseException, where: str) -> bytes:
    """Serialize an exception with its traceback text so the client can re-raise it."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    pickled: bytes | None
    try:
        pickled = cloudpickle.dumps(exc, protocol=PICKLE_PROTOCOL)
        pickle.loads(pickled)
    except Exception:
        pickled = None
    return pickle.dumps(
        (f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), text, pickled, where),
        protocol=PICKLE_PROTOCOL,
    )


def loads_error(payload: bytes) -> BaseException:
    """Rebuild a remote exception; its remote traceback is attached as a note."""
    type_name, message, text, pickled, where = pickle.loads(payload)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(f"{type_name}: {message}")
    note = f"Remote traceback (on {where}):\n{text.rstrip()}"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # Python 3.10
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]
    exc.remote_traceback = text  # type: ignore[attr-defined]
    return exc
