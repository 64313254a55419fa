"""``SkywardBackend``: a joblib parallel backend that runs batches on a ``sky.Compute``.

Which ``Compute`` a backend dispatches to, in order: the one passed as
``compute=`` (the plugin binds its own, and ``parallel_config(backend="skyward",
compute=c)`` works too), else the innermost ``Compute`` running the joblib
plugin, else the innermost running ``Compute`` (:func:`skyward.compute.current`).

Inside an agent the same name resolves to joblib's threading backend, so a
nested ``Parallel`` uses the worker's own cores and never calls back to the client.
In a child forked from the client while its cluster runs (``multiprocessing``), a
backend bound to that cluster becomes joblib's stock default backend again: the
cluster belongs to the parent.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
    ThreadingBackend,
)

from skyward.errors import ComputeStateError, NoWorkersError
from skyward.safety import current, running_here
from skyward_joblib import activation, threads
from skyward_joblib.feeder import feeder
from skyward_joblib.worker import RemoteBatch, in_agent

if TYPE_CHECKING:
    from skyward.compute import Call, Compute

__all__ = ["SkywardBackend", "NoComputeError"]

_GONE = object()
DEFAULT_PRE_DISPATCH = "2 * n_jobs"  # joblib.Parallel's default
PRE_DISPATCH = "3 * n_jobs"


class NoComputeError(RuntimeError):
    """The ``"skyward"`` joblib backend was used while no ``sky.Compute`` is running."""


def _settle(setter: Any, value: Any) -> None:
    try:
        setter(value)
    except InvalidStateError:  # the call was aborted and the future cancelled meanwhile
        pass


class SkywardBackend(AutoBatchingMixin, ParallelBackendBase):
    """Run joblib batches on the slots of a Skyward cluster.

    ``n_jobs=-1`` means every live slot (nodes x concurrency), ``-2`` all but one;
    a positive ``n_jobs`` smaller than the slot count caps the tasks in flight;
    ``n_jobs=1`` (and ``None`` with no configured default) runs in the client.

    Args:
        nesting_level: set by joblib.
        inner_max_num_threads: BLAS/OpenMP threads allowed per task on the workers;
            by default ``node CPUs // slots per node``, as loky's ``cpu_count() // n_jobs``
            (see :mod:`skyward_joblib.threads`).
        compute: the ``sky.Compute`` to use; see the module docstring for the default.
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = 1

    def __init__(
        self,
        nesting_level: int | None = None,
        inner_max_num_threads: int | None = None,
        compute: Compute | None = None,
        **backend_kwargs: Any,
    ) -> None:
        super().__init__(
            nesting_level=nesting_level,
            inner_max_num_threads=inner_max_num_threads,
            **backend_kwargs,
        )
        self.compute = compute
        self._target: Compute | None = None
        self._limit: int | None = None
        self._thread_env: dict[str, str] = {}
        self._lock = threading.Lock()
        self._inflight: dict[Future[Any], Future[Any] | None] = {}
        self._waiting: deque[tuple[Future[Any], RemoteBatch]] = deque()
        self._aborting = False
        self._call: Call | None = None
        self._sent = 0  # the user's tasks this call handed to the cluster

    def __reduce__(self) -> tuple[Any, ...]:
        # A Compute does not cross processes: a copy resolves its own.
        return SkywardBackend, (self.nesting_level, self.inner_max_num_threads)

    # --- which cluster, how many jobs -------------------------------------------------------

    def _forked(self) -> bool:
        """Bound to a cluster of the process this one was forked from."""
        compute = self.compute
        return compute is not None and compute.running and not running_here(compute)

    def resolve(self) -> Compute:
        """The running ``Compute`` this backend dispatches to; a clear error if there is none."""
        compute = self.compute or activation.active_compute() or current()
        if compute is None:
            raise NoComputeError(
                "joblib backend 'skyward' needs a running cluster: call Parallel inside "
                "`with sky.Compute(..., plugins=[sky.plugins.joblib()]):` (or inside any "
                "running sky.Compute when you select parallel_config(backend='skyward') "
                "yourself)"
            )
        if not compute.running:
            raise ComputeStateError(
                f"joblib backend 'skyward' is bound to {compute!r}, which is not running: "
                "use Parallel inside that Compute's `with` block"
            )
        return compute

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """Slots to use: ``-1`` all live slots, ``-k`` all but ``k - 1``, ``n`` as given."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if in_agent():
            return _local_backend(self.nesting_level).effective_n_jobs(n_jobs)
        if self._forked():
            return activation.stock_backend(self.nesting_level).effective_n_jobs(n_jobs)
        if n_jobs is None or n_jobs == 1:
            return 1
        slots = self.resolve().total_slots
        if slots < 1:
            raise NoWorkersError(
                "joblib backend 'skyward': the cluster has no live worker node left; "
                "check the nodes' stderr for the cause and start a new Compute"
            )
        if n_jobs < 0:
            return max(slots + 1 + n_jobs, 1)
        return n_jobs

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """Bind to the cluster for one ``Parallel`` call, or fall back to a local backend."""
        if in_agent():
            raise FallbackToBackend(_local_backend(self.nesting_level))
        if self._forked():
            raise FallbackToBackend(activation.stock_backend(self.nesting_level))
        n = self.effective_n_jobs(n_jobs)
        if n == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._target = self.resolve()
        # Below the slot count, this backend keeps at most n batches in flight. At or
        # above it, the cluster's own slots (plus its prefetch) bound the work.
        self._limit = n if n < self._target.total_slots else None
        self._thread_env = threads.task_env(self.inner_max_num_threads, self._target)
        if self._limit is None and getattr(parallel, "pre_dispatch", None) == DEFAULT_PRE_DISPATCH:
            # Nodes queue a few batches ahead of their slots only while more batches wait
            # than there are slots; joblib's default keeps exactly that many waiting.
            parallel.pre_dispatch = PRE_DISPATCH
        return n

    def start_call(self) -> None:
        """A new ``Parallel`` call starts: forget the previous call's abort, and open the
        cluster call that names a large argument by identity until :meth:`stop_call`."""
        with self._lock:
            self._aborting = False
            self._waiting.clear()
            self._sent = 0
            previous, self._call = self._call, None
            if self._target is not None:
                self._call = self._target.call()
                self._target.task_counts.follow(self, self._remaining)
        if previous is not None:
            previous.close()

    def _remaining(self) -> int | None:
        """The tasks this call will still hand to the cluster, once joblib knows its total
        (from the start for a sized input, else when its iterator is exhausted)."""
        parallel = self.parallel
        total = getattr(parallel, "n_tasks", None)
        if total is None:
            # joblib drops its iterator once exhausted; until then the total is unknown.
            iterating = getattr(parallel, "_iterating", True)
            if iterating or getattr(parallel, "_original_iterator", None) is not None:
                return None
            total = parallel.n_dispatched_tasks
        return max(total - self._sent, 0)

    def stop_call(self) -> None:
        """The ``Parallel`` call ended: from now on large arguments are matched by content,
        so an array changed in place before the next call is sent anew."""
        with self._lock:
            call, self._call = self._call, None
        if self._target is not None:
            self._target.task_counts.unfollow(self)
        if call is not None:
            call.close()

    def terminate(self) -> None:
        """The ``Parallel`` call is over (the cluster itself belongs to its ``Compute``)."""
        self.reset_batch_stats()
        if self._target is not None:
            self._target.task_counts.unfollow(self)
        self._target = None

    # --- dispatch --------------------------------------------------------------------------

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        """Queue one batch; the returned future resolves with the batch's list of results."""
        proxy: Future[Any] = Future()
        if callback is not None:
            proxy.add_done_callback(callback)
        task = RemoteBatch(func, self._thread_env)
        with self._lock:
            if self._aborting:
                proxy.cancel()
                return proxy
            if self._limit is not None and len(self._inflight) >= self._limit:
                self._waiting.append((proxy, task))
                return proxy
            self._inflight[proxy] = None
        feeder.put(self._launch, proxy, task)
        return proxy

    def _launch(self, proxy: Future[Any], task: RemoteBatch) -> None:
        """On the feeder thread: pickle ``task`` and hand it to the cluster."""
        with self._lock:
            if proxy not in self._inflight:
                return  # the call was aborted while the batch waited
            target = self._call or self._target
        try:
            if target is None:
                raise ComputeStateError("joblib backend 'skyward' was used after its call ended")
            remote = target.submit(task)
        except BaseException as exc:  # noqa: BLE001 - reported through the batch's future
            with self._lock:
                self._inflight.pop(proxy, None)
            _settle(proxy.set_exception, exc)
            return
        with self._lock:
            self._sent += task.task_count
            aborted = proxy not in self._inflight
            if not aborted:
                self._inflight[proxy] = remote
        if aborted:
            remote.cancel()
            return
        remote.add_done_callback(functools.partial(self._finished, proxy))

    def _finished(self, proxy: Future[Any], remote: Future[Any]) -> None:
        failed = not remote.cancelled() and remote.exception() is not None
        following: tuple[Future[Any], RemoteBatch] | None = None
        with self._lock:
            if self._inflight.pop(proxy, _GONE) is _GONE:
                return  # aborted: the proxy is already cancelled
            if not failed and self._waiting and not self._aborting:
                following = self._waiting.popleft()
                self._inflight[following[0]] = None
        if following is not None:
            feeder.put(self._launch, *following)
        if remote.cancelled():
            _settle(
                proxy.set_exception,
                CancelledError(
                    "a joblib batch was cancelled on the Skyward cluster (was the Compute "
                    "shut down while Parallel was running?)"
                ),
            )
        elif failed:
            # Report the error first, so joblib records it as the call's cause, then stop
            # every other batch of the call without waiting for joblib's own abort.
            _settle(proxy.set_exception, remote.exception())
            self._cancel_all()
        else:
            _settle(proxy.set_result, remote.result())

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """The batch's results, or its exception (original type, remote traceback as a note)."""
        return out.result()

    # --- abort -----------------------------------------------------------------------------

    def _cancel_all(self) -> None:
        with self._lock:
            self._aborting = True
            inflight = list(self._inflight.items())
            self._inflight.clear()
            waiting = list(self._waiting)
            self._waiting.clear()
        for proxy, remote in inflight:
            if remote is not None:
                remote.cancel()
            proxy.cancel()
        for proxy, _ in waiting:
            proxy.cancel()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel this call's queued batches and stop its running ones on the cluster."""
        self._cancel_all()
        if ensure_ready:
            with self._lock:
                self._aborting = False


def _local_backend(nesting_level: int | None) -> ParallelBackendBase:
    """Where ``"skyward"`` runs inside an agent: threads on the worker's own cores."""
    return ThreadingBackend(nesting_level=nesting_level)
