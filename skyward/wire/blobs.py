"""Blobs: large arguments and by-value functions, serialized once and sent to a node once.

Large arguments (numpy arrays, bytes, pandas objects above :data:`BLOB_THRESHOLD`)
and functions pickled by value become *blobs*: serialized, keyed by a content hash
and referenced from the task, so each is sent to a node once. Within one call (a
:class:`CallScope`: a ``Parallel`` call, a ``map``) each such object is serialized
once and then named by identity; outside, its content is hashed at every send, so
an in-place change is seen. Medium arrays (above :data:`REUSE_THRESHOLD`) become
blobs once the same object is sent again with unchanged content, so repeated ``y``
and index arrays are not re-sent either.

The scope lives here, beside the registry, because it is the registry's cache
policy: what may be named by identity, and for how long.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import types
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import cloudpickle
import lz4.frame

from skyward.wire.frames import HEADER, MAGIC, PICKLE_PROTOCOL, PROTOCOL, Kind, encode

BLOB_THRESHOLD = 1024 * 1024
REUSE_THRESHOLD = 16 * 1024


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
