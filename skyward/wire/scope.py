"""What may be named by identity, and for how long: the :class:`CallScope` of one call.

Within a call (a ``Parallel`` call, a ``Compute.map``, a ``compute.call()``) a large
argument and a function pickled by value are pickled and hashed once, then named by
identity; outside, content decides at every send. This is the blob registry's cache
policy (:mod:`skyward.wire.blobs`), kept apart from its memory policy.
"""

from __future__ import annotations

import types
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any


class IdentityMemo:
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
        self.objects = IdentityMemo()  # large argument -> blob key
        self.functions = IdentityMemo()  # function pickled by value -> FunctionBlob
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


def open_scope(scope: CallScope | None) -> CallScope | None:
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
    keys: tuple[str, ...] = ()  # the blobs its pickle names (large globals), sent before it

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
