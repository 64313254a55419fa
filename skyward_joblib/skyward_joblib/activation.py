"""Process-wide state while a ``Compute`` runs the joblib plugin.

joblib's ``parallel_config`` is per thread, so the plugin also makes
``"skyward"`` joblib's process-wide default backend, and it keeps only the
warning filters a worker can unpickle (see :mod:`skyward_joblib.filters`).
Activations may overlap and end in any order (two clusters in two threads):
the first one saves the original state and the last one to end restores it.
A child forked while a cluster runs gets the original state back at once: the
cluster is not its own.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from joblib import parallel as joblib_parallel

from skyward_joblib.filters import worker_safe

if TYPE_CHECKING:
    from skyward.compute import Compute

__all__ = ["BACKEND_NAME", "active_compute", "is_active", "process_default", "stock_backend"]

BACKEND_NAME = "skyward"

_lock = threading.Lock()
_computes: list[Compute] = []
# (previous default backend name, the filters list object, a copy of its content)
_saved: tuple[str, list[Any], list[Any]] | None = None


def active_compute() -> Compute | None:
    """The innermost ``Compute`` currently running the joblib plugin, if any."""
    with _lock:
        return _computes[-1] if _computes else None


def is_active(compute: Compute) -> bool:
    """Whether ``compute`` already runs the joblib plugin (e.g. through a second plugin)."""
    with _lock:
        return any(c is compute for c in _computes)


def _filters_mutated() -> None:
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


def _restore() -> None:
    """Put back the default backend and warning filters saved by the first activation."""
    global _saved
    if _saved is not None:
        default, filters, content = _saved
        _saved = None
        joblib_parallel.DEFAULT_BACKEND = default
        filters[:] = content
        _filters_mutated()


@contextmanager
def process_default(compute: Compute) -> Iterator[None]:
    """Make ``"skyward"`` (bound to ``compute``) the default backend of every thread."""
    global _saved
    with _lock:
        if not _computes:
            filters: list[Any] = warnings.filters  # type: ignore[assignment]
            _saved = (joblib_parallel.DEFAULT_BACKEND, filters, list(filters))
            filters[:] = worker_safe(filters)
            _filters_mutated()
            joblib_parallel.DEFAULT_BACKEND = BACKEND_NAME
        _computes.append(compute)
    try:
        yield
    finally:
        with _lock:
            for i in range(len(_computes) - 1, -1, -1):
                if _computes[i] is compute:
                    del _computes[i]
                    break
            if not _computes:
                _restore()


def stock_backend(nesting_level: int | None) -> Any:
    """A new instance of joblib's default backend as it is without Skyward (loky, usually)."""
    name = _saved[0] if _saved is not None else joblib_parallel.DEFAULT_BACKEND
    if name == BACKEND_NAME:  # made the default by hand, not by an activation
        name = "loky"
    return joblib_parallel.BACKENDS[name](nesting_level=nesting_level)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a parent thread may have held it while forking
    _computes.clear()
    _restore()


os.register_at_fork(after_in_child=_after_fork_in_child)
