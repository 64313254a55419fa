"""Blobs: large arguments and by-value functions, serialized once and sent to a node once.

Large arguments (numpy arrays, bytes, pandas objects above :data:`BLOB_THRESHOLD`)
and functions pickled by value become *blobs*: serialized, keyed by a content hash
and referenced from the task, so each is sent to a node once. Within one call (a
:class:`CallScope`: a ``Parallel`` call, a ``map``) each such object is serialized
once and then named by identity; outside, its content is hashed at every send, so
an in-place change is seen. Medium arrays (above :data:`REUSE_THRESHOLD`) become
blobs once the same object is sent again with unchanged content, so repeated ``y``
and index arrays are not re-sent either.

The scope (:mod:`skyward.wire.scope`) is the registry's cache policy: what may be
named by identity, and for how long. Its memory policy is here: a blob's frame is
held only while a pending task needs it, within :func:`blob_memory_limit`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from skyward.errors import BlobUnavailableError
from skyward.wire import oob
from skyward.wire.scope import CallScope, FunctionBlob, IdentityMemo, open_scope

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


BLOB_MEMORY_ENV = "SKYWARD_CLIENT_BLOB_BYTES"
_CHANGED = (
    "a task's large argument (blob {key}) was changed in place after the task was submitted "
    "and before all of it reached its node: within a call (a joblib Parallel call, "
    "compute.map, compute.call()) large arguments are sent from their own memory, not "
    "copied, so the content the task was given is gone. Pass a copy (a.copy()) of an "
    "argument you change while its tasks are pending"
)


def blob_memory_limit() -> int:
    """The client's bound on blob bytes held for tasks (see :class:`BlobRegistry`).

    ``SKYWARD_CLIENT_BLOB_BYTES`` when set, else a quarter of this machine's memory.
    """
    configured = os.environ.get(BLOB_MEMORY_ENV)
    if configured:
        try:
            value = int(configured)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(
                f"{BLOB_MEMORY_ENV}={configured!r} is not a number of bytes: set it to the "
                "most memory the client may keep for large arguments (e.g. 4294967296) or unset it"
            )
        return value
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, OSError, ValueError):
        return 4 << 30


@dataclass(eq=False)
class Blob:
    """A large object as the registry knows it: its key, size, frame, and where it came from.

    ``frame`` (the ``BLOB`` frame as buffers, the object's own memory out of band) is
    held only while tasks that need it are pending (``pins``); otherwise, or when
    the registry is over its bound, it is dropped and rebuilt from ``source`` (a weak
    reference to the object) if a node asks for it again.
    """

    key: str
    size: int
    frame: list[oob.Part] | None = None
    source: Callable[[], Any] | None = None
    pins: int = 0
    used: int = 0  # registry clock at the last pin or send: least recent is dropped first
    generation: int = 0  # bumped when frames sent under this key may have carried other bytes
    changed: bool = False  # its object changed in place while tasks still needed it
    owned: bool = False  # the frame holds copies of the object's buffers, not views
    dump: Callable[[Any], list[oob.Part]] | None = field(default=None, repr=False)


class BlobKeys(tuple[str, ...]):
    """The blob keys of one task, which keep those blobs' bytes available until released.

    The scheduler's task record holds it; :meth:`watch` releases the blobs when the
    task's future is done (or the record is gone, whichever comes first). It travels
    as a plain tuple.
    """

    _registry: BlobRegistry | None = None

    def watch(self, future: Future[Any]) -> None:
        """Release the blobs once ``future`` is done (idempotent)."""
        if self._registry is not None and not getattr(self, "_watched", False):
            self._watched = True
            future.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        """No task needs these blobs through this record any more."""
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.unpin(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return tuple, (tuple(self),)

    def __del__(self) -> None:
        # The collector may run this inside the registry's lock: leave the work to it.
        registry, self._registry = self._registry, None
        if registry is not None:
            registry._released.append(tuple(self))


class BlobRegistry:
    """Client-side: serialize each large object once and key it by the hash of its bytes.

    Large objects are named by identity only within a :class:`CallScope`; medium
    ones are remembered by identity (weakly) only to notice that they are sent again.

    Memory: a blob's frame (mostly views of the object's own memory) is kept while a
    pending task needs it (:class:`BlobKeys`), and dropped when none does, so an
    argument the caller dropped is freed. ``max_bytes`` (default
    :func:`blob_memory_limit`) bounds the frames held: beyond it the least recently
    used frames whose object is still alive are dropped, to be pickled again from
    the object if a node asks; only frames that could not be rebuilt (a ``bytes``
    argument) may keep the total above the bound. A node asking for a blob whose
    bytes and object are both gone gets a :class:`~skyward.errors.BlobUnavailableError`
    for its tasks.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = blob_memory_limit() if max_bytes is None else max_bytes
        self._lock = threading.RLock()
        self._seen = IdentityMemo()  # medium object -> content key when last sent ("": unhashed)
        self._last = IdentityMemo()  # object -> key of the frame last made from it
        self._blobs: dict[str, Blob] = {}
        self._dead: list[str] = []  # keys whose object was collected (tidied under the lock)
        self._released: list[tuple[str, ...]] = []  # keys of records collected unreleased
        self._inline = IdentityMemo()  # functions that shared objects with a task's other parts
        self._local = threading.local()
        self._clock = 0
        self.held = 0  # bytes of the frames held
        self.rebuilt = 0  # frames pickled again from their object after being dropped

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
        scope = open_scope(scope)
        key: str | None = scope.objects.get(obj) if scope is not None else None
        if key is None or not self._hold((key,)):
            # Outside a call the object is read now, as submit promises: an in-place change
            # after it must not reach the task. Within a call it is sent from its own memory.
            key = self._store(obj, oob.dumps(obj), owned=scope is None)
            if scope is not None:
                scope.objects.put(obj, key, strong=True)
        return key

    def function_blob(
        self,
        fn: object,
        scope: CallScope | None,
        dump: Callable[[Any], tuple[list[oob.Part], dict[int, Any], tuple[str, ...]]],
    ) -> FunctionBlob:
        """Pickle a by-value function as a blob (once per call within ``scope``).

        ``dump(fn)`` pickles it: ``(parts, pickler memo, keys of the blobs it names)``.
        """
        scope = open_scope(scope)
        blob: FunctionBlob | None = scope.functions.get(fn) if scope is not None else None
        if blob is None or not self._hold((*blob.keys, blob.key)):
            parts, memo, keys = dump(fn)
            key = self._store(fn, parts, rebuild=lambda f: dump(f)[0])
            blob = FunctionBlob(key, id(fn), memo, keys)
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
        parts = oob.dumps(obj)
        key = oob.digest(parts)
        if key != previous:
            self._seen.put(obj, key)
            return None
        return self._store(obj, parts, key, owned=True)  # a copy (under 1 MiB), never stale

    # --- frames: held while needed, within the bound ------------------------------------

    def _store(
        self,
        obj: object,
        parts: list[oob.Part],
        key: str | None = None,
        rebuild: Callable[[Any], list[oob.Part]] | None = None,
        owned: bool = False,
    ) -> str:
        """Hold ``obj``'s frame (``parts`` pickled) under its content key; return the key.

        ``owned``: the frame must hold copies of ``parts``, not views of the object; they
        are made unless such a frame is held for the key already (same content).
        """
        if key is None:
            key = oob.digest(parts)
        copied = False
        if owned:
            with self._lock:
                held = self._blobs.get(key)
                copied = held is None or held.frame is None or not held.owned
            if copied:  # outside the lock: a large copy must not hold up the I/O loop's sends
                parts = oob.owned(parts)
        try:
            source: Callable[[], Any] | None = weakref.ref(obj, partial(self._collected, key))
        except TypeError:
            source = None
        with self._lock:
            self._changed_since(obj, key)
            blob = self._blobs.get(key)
            if blob is None:
                blob = self._blobs[key] = Blob(key, sum(len(p) for p in parts))
            if source is not None or blob.source is None:
                blob.source, blob.dump, blob.changed = source, rebuild, False
            if blob.frame is None or (owned and not blob.owned):
                if blob.frame is None:
                    self.held += blob.size
                if owned and not copied:  # the held copy went meanwhile (rare)
                    parts = oob.owned(parts)
                blob.frame, blob.owned = oob.frame(key, parts), owned
            blob.pins += 1
            self._held_here().append(key)
            self._clock += 1
            blob.used = self._clock
        return key

    def _changed_since(self, obj: object, key: str) -> None:
        """``obj`` now pickles to ``key``: if a pending task's frame was made from it with
        other content, that frame (views of ``obj``'s memory) no longer holds what the task
        was given. It is dropped, so the task fails clearly instead of computing on other
        data, and nodes that got it may hold other bytes under its key: they get it again."""
        previous = self._last.get(obj)
        self._last.put(obj, key)
        if previous is None or previous == key:
            return
        old = self._blobs.get(previous)
        if old is None or old.pins <= 0 or old.source is None or old.source() is not obj:
            return
        if old.owned and old.frame is not None:
            return  # a copy: it still holds what its tasks were given
        self._drop_frame(old)
        old.source, old.changed = None, True
        old.generation += 1

    def generation(self, key: str) -> int:
        """Bumped when frames sent under ``key`` may have carried other bytes (see
        :meth:`_changed_since`): a node that got an older generation gets it again."""
        blob = self._blobs.get(key)
        return 0 if blob is None else blob.generation

    def _collected(self, key: str, ref: object) -> None:
        # Runs wherever the collector does, perhaps inside this registry's lock: only note it.
        self._dead.append(key)

    def _held_here(self) -> list[str]:
        """Keys this thread's task being pickled holds until :meth:`pin` or :meth:`abandon`."""
        held: list[str] | None = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = []
        return held

    def _hold(self, keys: Iterable[str]) -> bool:
        """Hold these known blobs for the task being pickled; False if one cannot be sent
        any more (its frame and object are gone): then it must be pickled anew."""
        with self._lock:
            blobs = [self._blobs.get(key) for key in keys]
            if any(b is None or (b.frame is None and b.source is None) for b in blobs):
                return False
            held = self._held_here()
            for blob in blobs:
                assert blob is not None
                blob.pins += 1
                held.append(blob.key)
            return True

    def pin(self, keys: Iterable[str]) -> BlobKeys:
        """The keys of a task about to be queued: their frames stay until it releases them.

        Every blob touched while pickling the task was held meanwhile (another thread's
        task finishing cannot drop it); those the task does not reference are let go.
        """
        pinned = BlobKeys(keys)
        with self._lock:
            self._tidy()
            for key in pinned:
                blob = self._blobs[key]
                blob.pins += 1
                self._clock += 1
                blob.used = self._clock
            if pinned:
                pinned._registry = self
            self.abandon()
            self._shrink()
        return pinned

    def abandon(self) -> None:
        """Let go of what this thread held for a task it will not queue (or just pinned)."""
        with self._lock:
            held = self._held_here()
            for key in held:
                self._unpin(key)
            held.clear()

    def unpin(self, keys: Iterable[str]) -> None:
        """A task no longer needs these blobs; frames nothing needs are dropped."""
        with self._lock:
            for key in keys:
                self._unpin(key)
            self._tidy()

    def _unpin(self, key: str) -> None:
        blob = self._blobs.get(key)
        if blob is None:
            return
        blob.pins -= 1
        if blob.pins <= 0:
            self._drop_frame(blob)
            if blob.source is None or blob.source() is None:
                del self._blobs[key]

    def _tidy(self) -> None:
        """Apply what the collector noted: records gone unreleased, objects freed."""
        while self._released:
            for key in self._released.pop():
                self._unpin(key)
        while self._dead:
            blob = self._blobs.get(self._dead.pop())
            if blob is not None and blob.source is not None and blob.source() is None:
                blob.source = None
                if blob.pins <= 0:
                    self._drop_frame(blob)
                    del self._blobs[blob.key]

    def _drop_frame(self, blob: Blob) -> None:
        if blob.frame is not None:
            blob.frame, blob.owned = None, False
            self.held -= blob.size

    def _shrink(self) -> None:
        """Over the bound: drop the least recently used frames that can be rebuilt."""
        if self.held <= self.max_bytes:
            return
        rebuildable = sorted(
            (b for b in self._blobs.values() if b.frame is not None and b.source is not None),
            key=lambda b: b.used,
        )
        for blob in rebuildable:
            if self.held <= self.max_bytes:
                break
            if blob.source is not None and blob.source() is not None:
                self._drop_frame(blob)

    def frame(self, key: str) -> list[oob.Part]:
        """The ``BLOB`` frame for ``key`` as buffers, pickled again from its object if dropped.

        Raises :class:`~skyward.errors.BlobUnavailableError` when neither the bytes nor
        the object remain, or the object changed since its tasks were submitted.
        """
        with self._lock:
            self._tidy()
            blob = self._blobs.get(key)
            if blob is not None:
                self._clock += 1
                blob.used = self._clock
                if blob.frame is not None:
                    return blob.frame
            obj = blob.source() if blob is not None and blob.source is not None else None
            dump = blob.dump if blob is not None else None
        if blob is None or obj is None:
            if blob is not None and blob.changed:
                raise BlobUnavailableError(_CHANGED.format(key=key))
            raise BlobUnavailableError(
                f"a task's large argument (blob {key}) must be sent to a node (again), but the "
                "client no longer holds it: its bytes were dropped to stay within "
                f"{BLOB_MEMORY_ENV}={self.max_bytes} and the object it came from was freed. "
                f"Raise {BLOB_MEMORY_ENV}, or keep the argument referenced until its tasks finish"
            )
        parts = dump(obj) if dump is not None else oob.dumps(obj)
        if oob.digest(parts) != key:
            raise BlobUnavailableError(_CHANGED.format(key=key))
        with self._lock:
            self.rebuilt += 1
            built = oob.frame(key, parts)
            if blob.frame is None and blob.pins > 0 and self._blobs.get(key) is blob:
                blob.frame = built
                self.held += blob.size
            self._shrink()
            return built

    def stats(self) -> dict[str, int]:
        """Blob bytes held and blobs known (for tests and benchmarks)."""
        with self._lock:
            self._tidy()
            return {"held_bytes": self.held, "blobs": len(self._blobs), "rebuilt": self.rebuilt}

    def clear(self) -> None:
        """Forget every blob."""
        with self._lock:
            self._seen.clear()
            self._last.clear()
            self._inline.clear()
            self._blobs.clear()
            self.held = 0
