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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

from joblib._parallel_backends import ParallelBackendBase

_in_agent = False


def in_agent() -> bool:
    """Whether this process is a Skyward agent (or a slot process of one)."""
    if _in_agent:
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "skyward.agent"


def _threadpool_limits(n_threads: int | list[dict[str, Any]]) -> Any:
    """``threadpoolctl.threadpool_limits(n)`` (applied now), or a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the environment variables still limit libraries loaded later
        return nullcontext()
    return threadpool_limits(limits=n_threads)


class _ThreadLimits:
    """BLAS/OpenMP thread limits for the batches that ask for them.

    Some pools belong to the whole agent process (OpenBLAS with pthreads, MKL), and
    threadpoolctl lets only one thread at a time change those. So one helper thread
    applies the limit when the first limited batch starts and restores the baseline
    after the last one ends, together with the environment variables. Pools kept per
    calling thread (OpenMP) are limited again in each batch's own thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved_env: dict[str, str | None] = {}
        self._process_limit: Any = None
        self._owner: ThreadPoolExecutor | None = None

    def _on_owner(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._owner is None:
            self._owner = ThreadPoolExecutor(1, thread_name_prefix="skyward-thread-limits")
        return self._owner.submit(fn, *args).result()

    @staticmethod
    def _enter(n_threads: int) -> Any:
        limiter = _threadpool_limits(n_threads)
        limiter.__enter__()
        return limiter

    @contextmanager
    def limit(self, n_threads: int) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                names = ParallelBackendBase.MAX_NUM_THREADS_VARS
                self._saved_env = {name: os.environ.get(name) for name in names}
                os.environ.update({name: str(n_threads) for name in names})
                self._process_limit = self._on_owner(self._enter, n_threads)
            self._holders += 1
        try:
            with _threadpool_limits(n_threads):
                yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._on_owner(self._process_limit.__exit__, None, None, None)
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

    @property
    def task_count(self) -> int:
        """The user's tasks in this batch: what the Compute's progress counts."""
        return len(self)

    def __call__(self) -> list[Any]:
        global _in_agent
        _in_agent = True
        if self.inner_max_num_threads is None:
            return self.batch()
        with thread_limits.limit(self.inner_max_num_threads):
            return self.batch()
