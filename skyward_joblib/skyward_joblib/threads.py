"""BLAS/OpenMP threads per task, chosen the way loky chooses them for its workers.

On the client, :func:`task_env` runs when each ``Parallel`` call starts, like loky's
``_prepare_worker_env``: every variable of joblib's ``MAX_NUM_THREADS_VARS`` gets
``inner_max_num_threads`` when it is given, else the client's own value when the
client sets that variable, else the default ``node CPUs // slots per node`` (at
least 1; the smallest over the live nodes), where loky uses ``cpu_count() //
n_jobs``. ``ENABLE_IPC`` (TBB) is ``"1"`` unless the client sets it.

On the worker, :data:`thread_limits` applies those values around each batch: as
environment variables (for processes the task starts and libraries it loads) and,
through threadpoolctl when it is installed, to the BLAS and OpenMP libraries
already loaded, which a long-lived worker has, unlike loky's fresh processes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from joblib._parallel_backends import ParallelBackendBase

if TYPE_CHECKING:
    from skyward.compute import Compute

__all__ = ["default_threads", "task_env", "thread_limits"]

TBB_IPC_VAR = ParallelBackendBase.TBB_ENABLE_IPC_VAR

# threadpoolctl's internal_api of each BLAS -> the variables it reads, the first set one wins.
_BLAS_VARS = (
    ("openblas", ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")),
    ("mkl", ("MKL_NUM_THREADS", "OMP_NUM_THREADS")),
    ("blis", ("BLIS_NUM_THREADS", "OMP_NUM_THREADS")),
    ("flexiblas", ("OMP_NUM_THREADS",)),
)
_OPENMP_VARS = ("OMP_NUM_THREADS",)


def default_threads(compute: Compute) -> int | None:
    """``node CPUs // slots`` (at least 1) for the live node with the fewest, if any reports."""
    shares = [
        max(int(node.info["cpus"]) // max(node.concurrency, 1), 1)
        for node in list(compute.nodes)
        if node.alive and node.info.get("cpus")
    ]
    return min(shares) if shares else None


def task_env(inner_max_num_threads: int | None, compute: Compute) -> dict[str, str]:
    """The thread variables for one ``Parallel`` call's tasks (read now, as loky does)."""
    default = default_threads(compute) if inner_max_num_threads is None else None
    env: dict[str, str] = {}
    for name in ParallelBackendBase.MAX_NUM_THREADS_VARS:
        if inner_max_num_threads is not None:
            env[name] = str(inner_max_num_threads)
        elif name in os.environ:
            env[name] = os.environ[name]
        elif default is not None:
            env[name] = str(default)
    env[TBB_IPC_VAR] = os.environ.get(TBB_IPC_VAR, "1")
    return env


def _count(value: str | None) -> int | None:
    """A thread count from a variable's value (``OMP_NUM_THREADS="4,2"`` means 4 here)."""
    head = (value or "").split(",")[0].strip()
    return int(head) if head.isdigit() and int(head) > 0 else None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in env:
            return _count(env[name])
    return None


class _ThreadLimits:
    """Applies a batch's thread variables in the worker, restoring them afterwards.

    BLAS pools (OpenBLAS with pthreads, MKL, BLIS) belong to the whole process, and so
    do environment variables: the first batch to start sets both, the last one to end
    restores them (concurrent batches of one thread-executor node share the first's
    values). OpenMP limits, and OpenBLAS's per-thread count, belong to the calling
    thread, so each batch sets its own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._saved_env: dict[str, str | None] = {}
        self._process_limits: list[Any] = []
        self._controller: Any = None
        self._modules = -1

    def _threadpoolctl(self) -> Any:
        """A threadpoolctl controller, refreshed when modules (so libraries) were loaded."""
        if len(sys.modules) != self._modules:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:  # the environment variables still limit libraries loaded later
                self._controller = None
            else:
                self._controller = ThreadpoolController()
            self._modules = len(sys.modules)
        return self._controller

    @contextmanager
    def limit(self, env: Mapping[str, str]) -> Iterator[None]:
        """Run the ``with`` body under the thread variables ``env``."""
        with self._lock:
            controller = self._threadpoolctl()
            if self._holders == 0:
                self._saved_env = {name: os.environ.get(name) for name in env}
                os.environ.update(env)
                if controller is not None:
                    self._process_limits = [
                        controller.select(internal_api=api).limit(limits=n)
                        for api, n in ((api, _first(env, names)) for api, names in _BLAS_VARS)
                        if n is not None
                    ]
            self._holders += 1
        openmp = _first(env, _OPENMP_VARS)
        local = None
        if controller is not None and openmp is not None:
            local = controller.limit(limits=openmp, user_api="openmp")
        blas = _first(env, _BLAS_VARS[0][1])
        openblas = _openblas_local(controller, blas) if blas is not None else []
        try:
            yield
        finally:
            for setter, previous in reversed(openblas):
                setter(previous)
            if local is not None:
                local.restore_original_limits()
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    for limiter in self._process_limits:
                        limiter.restore_original_limits()
                    self._process_limits = []
                    for name, value in self._saved_env.items():
                        if value is None:
                            os.environ.pop(name, None)
                        else:
                            os.environ[name] = value

    def reset(self) -> None:
        """In a forked child: forget the parent's holders (its threads are gone)."""
        self._lock = threading.Lock()
        self._holders = 0
        self._saved_env = {}
        self._process_limits = []


def _openblas_local(controller: Any, count: int) -> list[tuple[Any, int]]:
    """Set OpenBLAS's count for the calling thread; ``(setter, previous)`` to restore.

    OpenBLAS 0.3.27 and later also keep a count per calling thread, which the
    process-wide setting does not reach once a thread has its own: a task thread
    other than the first then computed with the library's default.
    """
    if controller is None:
        return []
    done = []
    for lib in controller.select(internal_api="openblas").lib_controllers:
        setter = getattr(lib.dynlib, "openblas_set_num_threads_local", None)
        if setter is not None:
            done.append((setter, int(setter(count))))
    return done


thread_limits = _ThreadLimits()
os.register_at_fork(after_in_child=thread_limits.reset)
