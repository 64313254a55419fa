"""A call on a ``Compute``: tasks submitted together (a ``map``, a joblib ``Parallel``
call), the scope within which identity may stand for content, and ``map``'s helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from skyward import wire

if TYPE_CHECKING:
    from skyward.compute import Compute

__all__ = ["Call", "chunks", "in_order"]

T = TypeVar("T")


class Call:
    """One call on a :class:`Compute`: many tasks that name the same data.

    Made by :meth:`Compute.call`. Within a call a large argument object (an array of
    1 MiB or more) and a function pickled by value are pickled and hashed once, then
    named by identity: an in-place change made while the call runs may go unseen by
    its later tasks. Once the call is closed, content decides again.
    """

    def __init__(self, compute: Compute, scope: wire.CallScope) -> None:
        self.compute = compute
        self._scope = scope

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """:meth:`Compute.submit`, as part of this call."""
        return self.compute._submit(fn, args, kwargs, self._scope)

    def close(self) -> None:
        """End the call (tasks already submitted run on)."""
        self._scope.close()

    def __enter__(self) -> Call:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def in_order(futures: list[Future[T]], end: float | None) -> Iterator[T]:
    """Yield results in order, as ``Executor.map`` does; cancel the rest on the way out."""
    futures.reverse()
    try:
        while futures:
            future = futures.pop()
            try:
                value = future.result(None if end is None else end - time.monotonic())
            except BaseException:
                future.cancel()
                raise
            del future
            yield value
    finally:
        for future in futures:
            future.cancel()


def chunks(items: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
