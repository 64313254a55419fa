"""The agent's blob cache: blobs by key, least recently used evicted beyond a capacity."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from skyward import wire
from skyward.wire import oob

DEFAULT_CACHE_BYTES = 4 * 1024**3


class BlobCache:
    """Blobs by key, least recently used evicted beyond ``capacity`` bytes.

    Thread mode keeps a :class:`~skyward.wire.LazyBlob`, unpickled by the first task
    that uses it (never here: ``put`` runs on the serve loop, which must go on
    answering heartbeats); process mode keeps the frame's body to forward to child slots.
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

    def put(self, body: bytes) -> tuple[str, Any]:
        """Hold the blob a ``BLOB`` frame's ``body`` carries; return its key and value (a
        lazy blob over slices of ``body``, or ``body`` itself in process mode)."""
        key, parts = oob.split(body)
        value: Any = body if self.keep_bytes else wire.LazyBlob(parts)
        with self._lock:
            self.received += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self.size -= old[0]
            self._entries[key] = (len(body), value)
            self.size += len(body)
            while self.size > self.capacity and len(self._entries) > 1:
                _, (size, _) = self._entries.popitem(last=False)
                self.size -= size
        return key, value

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
