"""Task payloads: pickling calls with blob references, and results and errors back.

A task is ``(function, args, kwargs)`` cloudpickled by a pickler whose
``reducer_override`` replaces blob-worthy objects with a reference to their blob
(see :mod:`skyward.wire.blobs`), so plain data pickles at C speed. A function
pickled by value travels as a blob of its own, unless it shares an object with
the rest of the task: then it is pickled inside the task, so that identity holds
on the node as it does with loky. Results use plain pickle first and cloudpickle
when it refuses; errors carry their type, message and remote traceback text.
"""

from __future__ import annotations

import enum
import io
import pickle
import sys
import threading
import traceback
import types
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import IO, Any

import cloudpickle

from skyward.errors import MissingBlobError, RemoteError, UnpicklableTaskError
from skyward.wire import oob
from skyward.wire.blobs import BLOB_THRESHOLD, BlobKeys, BlobRegistry, CallScope, FunctionBlob
from skyward.wire.frames import PICKLE_PROTOCOL
from skyward.wire.oob import Part


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
                blob = self.functions[id(obj)] = self._registry.function_blob(
                    obj, self._scope, self._dump_function
                )
            self.keys.extend(blob.keys)
            self.keys.append(blob.key)
            return _blob, (blob.key,)
        key = self._registry.key_for(obj, self._scope)
        if key is None:
            return super().reducer_override(obj)
        self.keys.append(key)
        return _blob, (key,)

    def _dump_function(self, fn: object) -> tuple[list[Part], dict[int, Any], tuple[str, ...]]:
        """Pickle a by-value function for its blob, its large globals as blobs of their own.

        So a function reading a 200 MB global pickles small, and the global travels
        (and is hashed, never trusted by identity outside a call) like an argument.
        """
        made: list[_FunctionPickler] = []

        def pickler(file: io.BytesIO, buffer_callback: Callable[[Any], None]) -> Any:
            made.append(_FunctionPickler(file, self._registry, self._scope, buffer_callback))
            return made[0]

        parts = oob.dumps(fn, pickler)
        return parts, made[0].memo.copy(), tuple(dict.fromkeys(made[0].keys))


class _FunctionPickler(cloudpickle.Pickler):
    """cloudpickle for a function blob: large objects it reaches become blob references."""

    def __init__(
        self,
        file: IO[bytes],
        registry: BlobRegistry,
        scope: CallScope | None,
        buffer_callback: Callable[[Any], None],
    ) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL, buffer_callback=buffer_callback)
        self._registry = registry
        self._scope = scope
        self.keys: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not types.FunctionType:  # functions it reaches stay in its pickle
            key = self._registry.key_for(obj, self._scope)
            if key is not None:
                self.keys.append(key)
                return _blob, (key,)
        return super().reducer_override(obj)

    def persistent_id(self, obj: object) -> str | None:
        return _bytes_blob(self, obj)


def _bytes_blob(pickler: _TaskPickler | _FunctionPickler, obj: object) -> str | None:
    """Large ``bytes`` as a blob reference (pickle's fast path skips ``reducer_override``)."""
    if type(obj) not in (bytes, bytearray) or len(obj) < BLOB_THRESHOLD:  # type: ignore[arg-type]
        return None
    key = pickler._registry.key_for(obj, pickler._scope)
    if key is not None:
        pickler.keys.append(key)
    return key


class _LargeTaskPickler(_TaskPickler):
    """For payloads that came out large: also ``bytes``/``bytearray`` become blobs (pickle
    saves those through fast paths that ``reducer_override`` never sees)."""

    def persistent_id(self, obj: object) -> str | None:
        return _bytes_blob(self, obj)


def dumps_task(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    registry: BlobRegistry,
    scope: CallScope | None = None,
) -> tuple[bytes, BlobKeys]:
    """Serialize a call; return the payload and the blob keys it references.

    The keys hold their blobs' bytes until released (:class:`~skyward.wire.BlobKeys`).

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
        registry.abandon()
        name = getattr(fn, "__qualname__", repr(fn))
        raise UnpicklableTaskError(
            f"cannot send task {name} to the cluster: {type(exc).__name__}: {exc}. Tasks and "
            "their arguments must be picklable by cloudpickle: avoid locks, open files, "
            "sockets and generators in arguments, or create them inside the task"
        ) from exc
    return buffer.getvalue(), registry.pin(dict.fromkeys(pickler.keys))


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


# Unpickling imports modules. Two threads importing one package (numpy) for the first
# time at once can see it half-initialized ("partially initialized module"), so the
# agent's threads unpickle one at a time.
_unpickling = threading.RLock()


@dataclass
class UnloadableBlob:
    """A blob the agent could not unpickle on arrival; tasks using it retry and report why."""

    parts: list[memoryview]


def _load(parts: list[memoryview]) -> Any:
    return _TaskUnpickler(io.BytesIO(parts[0]), buffers=parts[1:]).load()


def loads_blob(parts: list[memoryview]) -> Any:
    """Deserialize a blob from its parts (see :func:`skyward.wire.oob.split`); on failure
    keep them so each task using it reports the error."""
    try:
        with _unpickling:
            return _load(parts)
    except Exception:
        return UnloadableBlob(parts)


class LazyBlob:
    """A blob as it arrived, unpickled on first use by the thread of a task that needs it.

    Never by the agent's serve loop: unpickling can import a heavy package for seconds
    (scikit-learn under load: more than ten), and the serve loop must go on answering
    heartbeats meanwhile or a healthy node is declared lost. Arrays come out read-only,
    as loky's memmaps do; their data stays in the frame's buffer (out-of-band buffers
    are not copied).
    """

    __slots__ = ("_parts", "_value")

    def __init__(self, parts: list[memoryview]) -> None:
        self._parts: list[memoryview] | None = parts
        self._value: Any = None

    def value(self) -> Any:
        """The blob's object, unpickled once (under the agent's one unpickler lock)."""
        with _unpickling:
            if self._parts is not None:
                value = loads_blob(self._parts)
                if type(value).__name__ == "ndarray" and hasattr(value, "setflags"):
                    value.setflags(write=False)
                self._value, self._parts = value, None
            return self._value


_loading: dict[str, Any] = {}  # the blobs of the payload being unpickled (under _unpickling)


def _blob(key: str) -> Any:
    """Resolve a blob reference while a task payload is unpickled (see :func:`loads_task`)."""
    try:
        value = _loading[key]
    except KeyError:
        raise MissingBlobError(key) from None
    if isinstance(value, LazyBlob):
        value = value.value()
    if isinstance(value, UnloadableBlob):
        return _load(value.parts)
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


class ChunkRunner:
    """``Compute.map(chunksize=n)``'s task: calls ``fn`` on each argument tuple of a chunk.

    It runs on the worker, so it lives here (the agent imports the wire, never the client).
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        return [self.fn(*args) for args in chunk]

    @staticmethod
    def task_count(chunk: list[tuple[Any, ...]]) -> int:
        """Progress counts the user's calls, not chunks."""
        return len(chunk)


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
