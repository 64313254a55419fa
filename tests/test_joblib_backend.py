"""SkywardBackend's joblib contract, on one Local cluster of real agents (2 nodes x 3 slots)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pytest
from joblib import Parallel, delayed, parallel_config

import skyward as sky
from skyward_joblib import SkywardBackend

NODES, CONCURRENCY = 2, 3
SLOTS = NODES * CONCURRENCY

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster():
    with sky.Compute(
        nodes=NODES,
        worker=sky.Worker(concurrency=CONCURRENCY),
        plugins=[sky.plugins.joblib()],
    ) as compute:
        yield compute


def agent_pids(compute: sky.Compute) -> set[int]:
    return {node.pid for node in compute.nodes if node.pid is not None}


# --- task functions (module level: the agents import them from this file) ---------------------


def power(x: int, exponent: int = 2, offset: int = 0) -> int:
    return x**exponent + offset


def pid_of(_: object = None) -> int:
    return os.getpid()


def big_array(seed: int) -> np.ndarray:
    return np.full(1_000_000, float(seed))


def hold_until_seen(folder: str, expected: int, wait_s: float = 10.0) -> int:
    """Mark this task running; wait (bounded) until ``expected`` tasks run; return the most seen."""
    marker = Path(folder, uuid.uuid4().hex)
    marker.touch()
    seen = 0
    deadline = time.monotonic() + wait_s
    try:
        while seen < expected and time.monotonic() < deadline:
            seen = max(seen, len(os.listdir(folder)))
            time.sleep(0.005)
        time.sleep(0.05)  # let an over-admitted task show up before leaving
        return max(seen, len(os.listdir(folder)))
    finally:
        marker.unlink()


class TaskFailure(Exception):
    """An exception type the client must get back as itself."""


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise TaskFailure(f"task {x} failed")
    return x


def blas_threads_and_env(_: object = None) -> tuple[int, str | None]:
    import numpy  # noqa: F401 - load OpenBLAS so threadpoolctl sees it
    from threadpoolctl import threadpool_info

    blas = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    return min(blas), os.environ.get("OMP_NUM_THREADS")


def nested(i: int) -> dict[str, object]:
    inner_default = Parallel(n_jobs=2)(delayed(power)(i + j) for j in range(4))
    inner_named = Parallel(n_jobs=2, backend="skyward")(delayed(pid_of)() for _ in range(4))
    backend, _ = joblib.parallel.get_active_backend()
    return {
        "pid": os.getpid(),
        "default": inner_default,
        "named_pids": set(inner_named),
        "nested_backend": type(backend).__name__,
    }


# --- results ------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_results_equal_sequential_backend(cluster, return_as):
    expected = Parallel(backend="sequential")(delayed(power)(i) for i in range(300))
    out = Parallel(n_jobs=-1, return_as=return_as)(delayed(power)(i) for i in range(300))
    if return_as == "list":
        assert isinstance(out, list)
    else:
        assert not isinstance(out, list)
        out = list(out)
    if return_as == "generator_unordered":
        assert sorted(out) == sorted(expected)
    else:
        assert out == expected


def test_kwargs_reach_the_task(cluster):
    calls = [delayed(power)(i, exponent=3, offset=i) for i in range(50)]
    assert Parallel(n_jobs=-1)(calls) == Parallel(backend="sequential")(calls)


def test_large_return_values(cluster):
    out = Parallel(n_jobs=-1)(delayed(big_array)(i) for i in range(4))
    for i, array in enumerate(out):
        assert array.shape == (1_000_000,)
        assert np.all(array == float(i))


def test_tasks_run_in_agent_processes(cluster):
    pids = set(Parallel(n_jobs=-1, batch_size=1)(delayed(pid_of)(i) for i in range(60)))
    assert pids <= agent_pids(cluster)
    assert os.getpid() not in pids


def test_many_tiny_tasks_are_batched(cluster):
    before = cluster.stats()["tasks"]["submitted"]
    out = Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(20_000))
    submitted = cluster.stats()["tasks"]["submitted"] - before
    assert out == list(range(20_000))
    assert submitted < 20_000 / 10, f"{submitted} round trips for 20000 tiny tasks"


# --- how many in flight ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_jobs", "expected"), [(-1, SLOTS), (-2, SLOTS - 1), (3, 3), (20, SLOTS)]
)
def test_tasks_in_flight_match_n_jobs(cluster, tmp_path, n_jobs, expected):
    assert expected == min(SkywardBackend().effective_n_jobs(n_jobs), SLOTS)
    seen = Parallel(n_jobs=n_jobs, batch_size=1)(
        delayed(hold_until_seen)(str(tmp_path), expected) for _ in range(2 * expected)
    )
    assert max(seen) == expected


@pytest.mark.parametrize("n_jobs", [1, None])
def test_one_job_runs_in_the_client(cluster, n_jobs):
    before = cluster.stats()["tasks"]["submitted"]
    pids = Parallel(n_jobs=n_jobs)(delayed(pid_of)(i) for i in range(5))
    assert set(pids) == {os.getpid()}
    assert cluster.stats()["tasks"]["submitted"] == before


def test_effective_n_jobs_follows_live_slots(cluster):
    backend = SkywardBackend()
    assert backend.effective_n_jobs(-1) == SLOTS
    assert backend.effective_n_jobs(-SLOTS) == 1
    assert backend.effective_n_jobs(50) == 50
    assert joblib.effective_n_jobs(-1) == SLOTS
    with pytest.raises(ValueError, match="n_jobs == 0"):
        backend.effective_n_jobs(0)


# --- errors -----------------------------------------------------------------------------------


def test_error_keeps_type_and_remote_traceback(cluster):
    with pytest.raises(TaskFailure, match="task 7 failed") as info:
        Parallel(n_jobs=-1)(delayed(fail_on)(i, 7) for i in range(40))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Remote traceback" in notes
    assert "fail_on" in notes
    # The backend is usable again after an aborted call.
    assert Parallel(n_jobs=-1)(delayed(power)(i) for i in range(10)) == [i * i for i in range(10)]


# --- thread limits, nesting, threads, progress -----------------------------------------------


def test_inner_max_num_threads_applies_on_the_worker(cluster):
    def probe(count: int) -> list[tuple[int, str | None]]:
        calls = (delayed(blas_threads_and_env)() for _ in range(count))
        return Parallel(n_jobs=2, batch_size=1)(calls)

    unlimited = probe(2)
    with parallel_config(backend="skyward", inner_max_num_threads=1):
        limited = probe(4)
    assert set(limited) == {(1, "1")}
    after = probe(2)
    assert after == unlimited  # the agents' own settings came back


def test_nested_parallel_runs_on_the_worker(cluster):
    out = Parallel(n_jobs=-1, batch_size=1)(delayed(nested)(i) for i in range(4))
    pids = agent_pids(cluster)
    for i, result in enumerate(out):
        assert result["pid"] in pids
        assert result["default"] == [(i + j) ** 2 for j in range(4)]
        # backend="skyward" written inside a task resolves to the worker's own threads
        assert result["named_pids"] == {result["pid"]}
        assert result["nested_backend"] == "ThreadingBackend"


def test_parallel_from_another_thread_runs_on_the_cluster(cluster):
    def run() -> list[int]:
        return Parallel(n_jobs=-1, batch_size=1)(delayed(pid_of)(i) for i in range(12))

    with ThreadPoolExecutor(1) as pool:
        pids = set(pool.submit(run).result(timeout=60))
    assert threading.current_thread() is threading.main_thread()
    assert pids <= agent_pids(cluster)


def test_explicit_inner_parallel_config_wins(cluster):
    with parallel_config(backend="threading"):
        pids = set(Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4)))
    assert pids == {os.getpid()}


def test_verbose_progress_messages(cluster, capsys):
    Parallel(n_jobs=2, verbose=10, batch_size=1)(delayed(power)(i) for i in range(6))
    err = capsys.readouterr().err
    assert "Using backend SkywardBackend with 2 concurrent workers." in err
    assert "Done   6 out of   6" in err
