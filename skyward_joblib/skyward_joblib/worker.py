"""What runs inside the agent: the batch wrapper, thread limits, and agent detection.

A joblib batch reaches the worker wrapped in :class:`RemoteBatch`. Unpickling it
imports this package, which registers the ``"skyward"`` backend name there too,
so a ``Parallel(backend="skyward")`` written inside a task resolves, and
:func:`in_agent` makes it fall back to a local backend on the worker's own cores.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from joblib._parallel_backends import ParallelBackendBase

_in_agent = False


def in_agent() -> bool:
    """Whether this process is a Skyward agent (or a slot process of one)."""
    if _in_agent:
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "skyward.agent"


class _ThreadLimits:
    """Process-wide BLAS/OpenMP thread limits, held while at least one limited batch runs.

    Native thread pools and environment variables belong to the whole process, so
    concurrent batches on the thread executor share one setting: the first limited
    batch applies it and the last one to finish restores the previous state.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved_env: dict[str, str | None] = {}
        self._controller: Any = None

    @contextmanager
    def limit(self, n_threads: int) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._apply(n_threads)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._restore()

    def _apply(self, n_threads: int) -> None:
        names = ParallelBackendBase.MAX_NUM_THREADS_VARS
        self._saved_env = {name: os.environ.get(name) for name in names}
        os.environ.update({name: str(n_threads) for name in names})
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # env vars still limit libraries loaded from now on
            self._controller = None
        else:
            self._controller = threadpool_limits(limits=n_threads)

    def _restore(self) -> None:
        if self._controller is not None:
            self._controller.restore_original_limits()
            self._controller = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


thread_limits = _ThreadLimits()


class RemoteBatch:
    """A joblib batch as shipped to a worker: runs it under the requested thread limits."""

    __slots__ = ("batch", "inner_max_num_threads")

    def __init__(self, batch: Callable[[], list[Any]], inner_max_num_threads: int | None) -> None:
        self.batch = batch
        self.inner_max_num_threads = inner_max_num_threads

    def __getstate__(self) -> tuple[Callable[[], list[Any]], int | None]:
        return self.batch, self.inner_max_num_threads

    def __setstate__(self, state: tuple[Callable[[], list[Any]], int | None]) -> None:
        self.batch, self.inner_max_num_threads = state

    def __len__(self) -> int:
        return len(self.batch) if hasattr(self.batch, "__len__") else 1

    def __call__(self) -> list[Any]:
        global _in_agent
        _in_agent = True
        if self.inner_max_num_threads is None:
            return self.batch()
        with thread_limits.limit(self.inner_max_num_threads):
            return self.batch()
