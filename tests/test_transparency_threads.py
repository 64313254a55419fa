"""Issue 12, rows 1 and 4: BLAS/OpenMP threads inside tasks are what loky gives its workers.

Row 1: by default each task may use ``node CPUs // slots`` threads, Local nodes sharing
this machine's CPUs, as loky gives ``cpu_count() // n_jobs``; each case is compared with
loky in the same test. Row 4: the client's ``*_NUM_THREADS`` variables, read when each
``Parallel`` call starts, reach the tasks and win over the default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from joblib import Parallel, delayed, parallel_config
from joblib._parallel_backends import ParallelBackendBase

import skyward as sky
from skyward.agent.cpus import cpu_count

pytestmark = pytest.mark.timeout(120)

THREAD_VARS = [*ParallelBackendBase.MAX_NUM_THREADS_VARS, "ENABLE_IPC"]


def threads_seen() -> tuple[int, dict[str, str | None]]:
    """What a task sees: OpenBLAS's current thread count and the thread variables."""
    import numpy as np
    from threadpoolctl import threadpool_info

    a = np.ones((200, 200))
    a @ a  # OpenBLAS starts its pool on first use
    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas, "numpy is not linked to a BLAS that threadpoolctl knows"
    return min(blas), {name: os.environ.get(name) for name in THREAD_VARS}


Seen = tuple[int, tuple[tuple[str, str | None], ...]]


def run(backend: str, n_jobs: int, calls: int = 4) -> set[Seen]:
    out = Parallel(n_jobs=n_jobs, backend=backend, batch_size=1)(
        delayed(threads_seen)() for _ in range(calls)
    )
    return {(threads, tuple(sorted(env.items()))) for threads, env in out}


@pytest.fixture
def no_thread_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client sets none of the variables (as on a fresh machine) unless a test does."""
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["thread", "process"])
def two_local_nodes(request: pytest.FixtureRequest, no_thread_vars: None) -> Iterator[sky.Compute]:
    """``Local(nodes=2)`` x 1 slot: what loky's ``n_jobs=2`` is on this machine."""
    worker = sky.Worker(concurrency=1, executor=request.param)
    with sky.Compute(nodes=2, worker=worker, plugins=[sky.plugins.joblib()]) as compute:
        yield compute


def test_default_threads_per_task_are_lokys(two_local_nodes: sky.Compute) -> None:
    expected = max(cpu_count() // 2, 1)
    assert {node.info["cpus"] for node in two_local_nodes.nodes} == {expected}
    loky = run("loky", n_jobs=2)
    skyward = run("skyward", n_jobs=2)
    assert skyward == loky
    assert {threads for threads, _ in skyward} == {expected}


def test_inner_max_num_threads_overrides_the_default(two_local_nodes: sky.Compute) -> None:
    with parallel_config(backend="loky", inner_max_num_threads=1):
        loky = run("loky", n_jobs=2)
    with parallel_config(backend="skyward", inner_max_num_threads=1):
        skyward = run("skyward", n_jobs=2)
    assert skyward == loky
    assert {threads for threads, _ in skyward} == {1}


def test_client_thread_variables_reach_the_tasks_at_each_call(
    no_thread_vars: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One node with one slot (n_jobs=2 queues on it): its default is every CPU here.
    with sky.Compute(nodes=1, plugins=[sky.plugins.joblib()]):
        default = run("skyward", n_jobs=2, calls=2)
        assert {threads for threads, _ in default} == {cpu_count()}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # while the cluster runs
        limited = run("skyward", n_jobs=2, calls=2)
        assert len(limited) == 1
        threads, env = limited.pop()
        assert threads == 1
        assert dict(env)["OPENBLAS_NUM_THREADS"] == "1"
        assert dict(env)["OMP_NUM_THREADS"] == str(cpu_count())  # the others keep the default
        monkeypatch.delenv("OPENBLAS_NUM_THREADS")
        assert run("skyward", n_jobs=2, calls=2) == default


def test_client_variables_match_loky(
    two_local_nodes: sky.Compute, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown()  # loky reads the variables when it starts workers
    assert run("skyward", n_jobs=2) == run("loky", n_jobs=2)
