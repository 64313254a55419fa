"""The frame protocol spoken between the client and an agent over any byte stream.

A frame is a fixed header ``magic | protocol | kind | flags | length`` followed
by a body. Bodies above :data:`COMPRESS_THRESHOLD` bytes are compressed with
``lz4.frame`` (flag :data:`FLAG_LZ4`) when that makes them smaller.

Task payloads are cloudpickled. Large arguments (numpy arrays, bytes, pandas
objects above :data:`BLOB_THRESHOLD`) and functions pickled by value become
*blobs*: serialized, keyed by a content hash and referenced from the task (a
reduce to :func:`_blob`, or a persistent id for large ``bytes``), so each is
sent to a node once. Within one call (a :class:`CallScope`: a ``Parallel`` call,
a ``map``) each such object is serialized once and then named by identity;
outside, its content is hashed at every send, so an in-place change is seen.
Medium arrays (above :data:`REUSE_THRESHOLD`) become blobs once the same object
is sent again with unchanged content, so repeated ``y`` and index arrays are not
re-sent either. A function is pickled inside its task instead when it shares an
object with the rest of the task, so that identity holds on the node.
"""

from __future__ import annotations

import enum
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
from collections.abc import Callable, Collection, Iterable
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


class _IdentityMemo:
    """Values keyed by object identity, each valid only while its object lives.

    An object that cannot be weakly referenced (``bytes``) is held when ``strong``,
    else not remembered. A lost entry only costs a recomputation.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, bool, Any]] = {}

    def get(self, obj: object) -> Any:
        """The value remembered for this very object, or ``None``."""
        entry = self._entries.get(id(obj))
        if entry is None:
            return None
        ref, weak, value = entry
        return value if (ref() if weak else ref) is obj else None

    def put(self, obj: object, value: Any, strong: bool = False) -> None:
        ident = id(obj)
        entry: tuple[Any, bool, Any]
        try:
            entry = (weakref.ref(obj, partial(self._drop, ident)), True, value)
        except TypeError:
            if not strong:
                return
            entry = (obj, False, value)
        self._entries[ident] = entry

    def _drop(self, ident: int, ref: weakref.ref[Any]) -> None:
        entry = self._entries.get(ident)
        if entry is not None and entry[0] is ref:
            self._entries.pop(ident, None)

    def clear(self) -> None:
        self._entries = {}


class CallScope:
    """One call (a ``Parallel`` call, a ``Compute.map``), during which identity names data.

    Within a scope each large argument object and each function pickled by value is
    pickled and hashed once: sent again during the call, it is named by identity,
    without looking at its content (joblib's dask backend scopes its cache to a call
    the same way). Outside any scope, and after :meth:`close`, content decides every
    time, so an array changed in place between calls is always seen.
    """

    def __init__(self) -> None:
        self.objects = _IdentityMemo()  # large argument -> blob key
        self.functions = _IdentityMemo()  # function pickled by value -> FunctionBlob
        self.closed = False

    def close(self) -> None:
        """End the call: forget every identity (later sends are matched by content)."""
        self.closed = True
        self.objects.clear()
        self.functions.clear()

    def __enter__(self) -> CallScope:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _open(scope: CallScope | None) -> CallScope | None:
    """``scope`` while its call runs, else ``None`` (a closed scope names nothing)."""
    return scope if scope is not None and not scope.closed else None


@dataclass
class FunctionBlob:
    """A function pickled by value as a blob of its own, with its pickler's memo.

    The memo (``id`` -> ``(index, object)``) holds every object of that pickle alive,
    so that its ids can be compared with another pickle's (see :func:`dumps_task`).
    """

    key: str
    owner: int  # id of the function
    memo: dict[int, tuple[int, Any]]

    @property
    def function(self) -> Any:
        """The function itself."""
        return self.memo[self.owner][1]

    def namespaces(self) -> set[int]:
        """Ids of the module globals of the functions this pickle holds by value."""
        return {
            id(obj.__globals__)
            for _, obj in self.memo.values()
            if type(obj) is types.FunctionType and id(obj.__code__) in self.memo
        }


class BlobRegistry:
    """Client-side: serialize each large object once and key it by the hash of its bytes.

    Large objects are named by identity only within a :class:`CallScope`; medium
    ones are remembered by identity (weakly) only to notice that they are sent again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen = _IdentityMemo()  # medium object -> content key when last sent ("": unhashed)
        self._blobs: dict[str, Blob] = {}
        self._inline = _IdentityMemo()  # functions that shared objects with a task's other parts

    def scope(self) -> CallScope:
        """Open the scope of one call; close it (or leave its ``with``) when the call ends."""
        return CallScope()

    def key_for(self, obj: object, scope: CallScope | None = None) -> str | None:
        """Return the blob key for ``obj`` if it should travel as a blob, else ``None``."""
        size = _nbytes(obj)
        if size < REUSE_THRESHOLD:
            return None
        if size < BLOB_THRESHOLD:
            return self._medium(obj, self._seen.get(obj))
        scope = _open(scope)
        key: str | None = scope.objects.get(obj) if scope is not None else None
        if key is None:
            key = self._store(cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL))
            if scope is not None:
                scope.objects.put(obj, key, strong=True)
        return key

    def function_blob(self, fn: object, scope: CallScope | None = None) -> FunctionBlob:
        """Pickle a by-value function as a blob (once per call within ``scope``)."""
        scope = _open(scope)
        blob: FunctionBlob | None = scope.functions.get(fn) if scope is not None else None
        if blob is None:
            buffer = io.BytesIO()
            pickler = cloudpickle.Pickler(buffer, protocol=PICKLE_PROTOCOL)
            pickler.dump(fn)
            blob = FunctionBlob(self._store(buffer.getvalue()), id(fn), pickler.memo.copy())
            if scope is not None:
                scope.functions.put(fn, blob)
        return blob

    def keep_inline(self, functions: Iterable[FunctionBlob]) -> None:
        """Pickle these functions inside their tasks from now on: a task of theirs needed it.

        Only a shortcut: the next task with one of them is pickled once, not twice.
        """
        for blob in functions:
            self._inline.put(blob.function, True)

    def travels_inline(self, fn: object) -> bool:
        """Whether :meth:`keep_inline` was asked for ``fn``."""
        return self._inline.get(fn) is not None

    def _medium(self, obj: object, previous: str | None) -> str | None:
        """Inline, until the same object is sent again with the same content: then a blob.

        scikit-learn's ``y`` and CV index arrays go with every fit and become blobs; a
        buffer refilled in place between sends keeps travelling inline. Medium objects
        are hashed on every send after the first (about 1 ms per MB), never stale.
        """
        if previous is None:
            self._seen.put(obj, "")
            return None
        data = cloudpickle.dumps(obj, protocol=PICKLE_PROTOCOL)
        key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key != previous:
            self._seen.put(obj, key)
            return None
        return self._store(data, key)

    def _store(self, data: bytes, key: str | None = None) -> str:
        """Keep ``data`` under its content hash (``key`` when already computed); return it."""
        if key is None:
            key = hashlib.blake2b(data, digest_size=16).hexdigest()
        if key not in self._blobs:
            blob = Blob.of(key, data)
            with self._lock:
                self._blobs.setdefault(key, blob)
        return key

    def get(self, key: str) -> Blob:
        """The blob for ``key`` (it stays available while this registry lives)."""
        return self._blobs[key]

    def clear(self) -> None:
        """Forget every blob."""
        with self._lock:
            self._seen.clear()
            self._inline.clear()
            self._blobs.clear()


def _splits_identity(memo: dict[int, Any], functions: Collection[FunctionBlob]) -> bool:
    """Whether pickling ``functions`` apart from the task whose pickler memo is ``memo``,
    and from each other, would make two objects on the node of what is one here.

    Pickler memos hold their objects alive, so equal ids mean one object. Two
    by-value functions of one module also share their globals namespace, which only
    a single pickle keeps shared.
    """
    seen = memo
    last = len(functions) - 1
    for index, blob in enumerate(functions):
        common = seen.keys() & blob.memo.keys()
        common.discard(blob.owner)
        if any(_identity_matters(blob.memo[ident][1], blob.memo) for ident in common):
            return True
        if index < last:
            seen = {**seen, **blob.memo}
    namespaces: set[int] = set()
    for blob in functions if last > 0 else ():
        own = blob.namespaces()
        if not namespaces.isdisjoint(own):
            return True
        namespaces |= own
    return False


def _identity_matters(obj: object, memo: dict[int, tuple[int, Any]]) -> bool:
    """Whether a second copy of ``obj`` (pickled in ``memo``) would be observable.

    Not for immutable values, classes (cloudpickle's class tracker keeps a class
    pickled by value one class on the node), and functions pickled by reference,
    which resolve to the same object by import. A function was pickled by value
    when its code object was pickled too.
    """
    cls = type(obj)
    if cls in _IMMUTABLE:
        return False
    if cls is types.FunctionType:
        return id(obj.__code__) in memo  # type: ignore[attr-defined]
    canonical: tuple[type, ...] = (type, enum.Enum)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        canonical += (numpy.dtype, numpy.generic)
    return not isinstance(obj, canonical)


_IMMUTABLE = frozenset(
    {
        str,
        bytes,
        bool,
        int,
        float,
        complex,
        tuple,
        frozenset,
        range,
        slice,
        type,
        type(None),
        type(Ellipsis),
        type(NotImplemented),
        types.CodeType,
        types.BuiltinFunctionType,
        types.ModuleType,
        pickle.PickleBuffer,
    }
)


class _TaskPickler(cloudpickle.Pickler):
    """cloudpickle, with blob-worthy objects replaced by a reference to their blob.

    The reference is a reduce ``(_blob, (key,))``: pickle consults ``reducer_override``
    only for objects it has no built-in fast path for (functions, arrays, frames...),
    and memoizes the result, so plain data pickles at C speed and an object named
    10**5 times in a batch is looked at once. Functions pickled by value become blobs
    of their own unless ``inline`` (see :func:`dumps_task`); ``functions`` remembers
    them by ``id`` for the task's next pickling.
    """

    def __init__(
        self,
        file: IO[bytes],
        registry: BlobRegistry,
        scope: CallScope | None,
        inline: bool,
        functions: dict[int, FunctionBlob],
    ) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._registry = registry
        self._scope = scope
        self._inline = inline
        self.functions = functions
        self._namespaces: dict[int, int] = {}  # id of a function's globals -> id of the function
        self.keys: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if not self._inline and type(obj) is types.FunctionType and _by_value(obj):
            blob = self.functions.get(id(obj))
            if blob is None:
                namespace = self._namespaces.setdefault(id(obj.__globals__), id(obj))
                if namespace != id(obj) or self._registry.travels_inline(obj):
                    raise _Inline
                blob = self.functions[id(obj)] = self._registry.function_blob(obj, self._scope)
            self.keys.append(blob.key)
            return _blob, (blob.key,)
        key = self._registry.key_for(obj, self._scope)
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
        key = self._registry.key_for(obj, self._scope)
        if key is not None:
            self.keys.append(key)
        return key


class UnpicklableTaskError(TypeError):
    """A task (function or argument) cannot be serialized for the cluster."""


def dumps_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    registry: BlobRegistry,
    scope: CallScope | None = None,
) -> tuple[bytes, tuple[str, ...]]:
    """Serialize a call; return the payload and the blob keys it references.

    Functions pickled by value travel as blobs, sent to each node once. When one of
    them shares an object with the rest of the task (a closure over an argument, two
    closures over one list), the task is pickled again in one piece, functions
    included, so that the node sees one object where the client has one, as with loky.
    """
    task = (fn, args, kwargs)
    functions: dict[int, FunctionBlob] = {}
    try:
        try:
            buffer, pickler = _pickle(_TaskPickler, task, registry, scope, False, functions)
            blobs = list(functions.values())
            inline = bool(blobs) and _splits_identity(pickler.memo.copy(), blobs)
        except _Inline:
            inline = True
        if inline:
            registry.keep_inline(functions.values())
            buffer, pickler = _pickle(_TaskPickler, task, registry, scope, True, functions)
        if buffer.tell() >= BLOB_THRESHOLD:
            buffer, pickler = _pickle(_LargeTaskPickler, task, registry, scope, inline, functions)
    except Exception as exc:
        name = getattr(fn, "__qualname__", repr(fn))
        raise UnpicklableTaskError(
            f"cannot send task {name} to the cluster: {type(exc).__name__}: {exc}. Tasks and "
            "their arguments must be picklable by cloudpickle: avoid locks, open files, "
            "sockets and generators in arguments, or create them inside the task"
        ) from exc
    return buffer.getvalue(), tuple(dict.fromkeys(pickler.keys))


def _pickle(
    kind: type[_TaskPickler],
    task: object,
    registry: BlobRegistry,
    scope: CallScope | None,
    inline: bool,
    functions: dict[int, FunctionBlob],
) -> tuple[io.BytesIO, _TaskPickler]:
    buffer = io.BytesIO()
    pickler = kind(buffer, registry, scope, inline, functions)
    pickler.dump(task)
    return buffer, pickler


class _Inline(Exception):
    """Raised by the task pickler as soon as the task's functions must travel inside it."""


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
