"""Issue 12, row 3: nothing of Skyward's survives into a child forked while a cluster runs.

Forked ``multiprocessing`` pools and joblib's ``"multiprocessing"`` backend work inside a
``Compute``, call after call, and ``Pool.terminate()`` stops their workers: a worker does
not inherit our SIGTERM handler, the cluster, or a lock one of our threads held.
Scenarios that could hang run in a child interpreter with a deadline.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator

import pytest
from skyward_joblib.feeder import feeder

import skyward as sky
import skyward.compute
import skyward.safety
from skyward_joblib import activation

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
]


def run_script(code: str, timeout: float = 90) -> str:
    """Run ``code`` in a fresh interpreter (own session); kill its whole group on timeout."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hung for {timeout}s; output so far:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


POOLS = """
    import multiprocessing
    import os

    from joblib import Parallel, delayed

    import skyward as sky


    def square(x):
        return x * x


    if __name__ == "__main__":
        fork = multiprocessing.get_context("fork")
        with sky.Compute(nodes=1, plugins=[sky.plugins.joblib()]) as compute:
            for i in range(CALLS):
                with fork.Pool(2) as pool:  # __exit__ is Pool.terminate()
                    assert pool.map(square, range(20)) == [x * x for x in range(20)]
                out = Parallel(n_jobs=2, backend="multiprocessing")(
                    delayed(square)(x) for x in range(20)
                )
                assert out == [x * x for x in range(20)]
            pool = fork.Pool(2)
            workers = [p.pid for p in pool._pool]
            for _ in range(CALLS):
                pool.map(square, range(8))
            pool.terminate()
            pool.join()
            assert not any(p.is_alive() for p in pool._pool), workers
            assert compute.submit(square, 7).result(timeout=30) == 49  # the cluster is fine
        print("pools ok")
"""


def test_forked_pools_work_repeatedly_and_terminate() -> None:
    assert "pools ok" in run_script(POOLS.replace("CALLS", "40"), timeout=150)


CHILD_VIEW = """
    import multiprocessing
    import os
    import signal

    import joblib
    from joblib import Parallel, delayed

    import skyward as sky
    import skyward.compute


    def view(_):
        pids = set(Parallel(n_jobs=2)(delayed(os.getpid)() for _ in range(4)))
        return {
            "sigterm_default": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
            "no_cluster": skyward.compute.current() is None,
            "default_backend": joblib.parallel.DEFAULT_BACKEND,
            "parallel_ran_here": pids == {os.getpid()},
        }


    if __name__ == "__main__":
        fork = multiprocessing.get_context("fork")
        with sky.Compute(nodes=1, plugins=[sky.plugins.joblib()]):
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            with fork.Pool(1) as pool:
                seen = pool.apply_async(view, (0,)).get(timeout=30)
        print(seen)
        assert seen == {
            "sigterm_default": True,
            "no_cluster": True,
            "default_backend": "loky",
            "parallel_ran_here": True,
        }, seen
        print("child ok")
"""


def test_forked_child_sees_no_cluster_and_default_sigterm() -> None:
    # In a pool worker (a daemon process), Parallel falls back to joblib's stock default,
    # loky, which runs sequentially there: exactly what it does without Skyward.
    assert "child ok" in run_script(CHILD_VIEW)


def test_sigterm_handler_lives_only_while_a_compute_runs() -> None:
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sky.Compute(nodes=1):
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture
def held_by_a_thread() -> Iterator[Callable[[object], None]]:
    """``hold(lock)`` keeps ``lock`` acquired by another thread until the test ends."""
    release = threading.Event()
    threads: list[threading.Thread] = []

    def hold(lock: object) -> None:
        acquired = threading.Event()

        def keep() -> None:
            with lock:  # type: ignore[attr-defined]
                acquired.set()
                release.wait(60)

        thread = threading.Thread(target=keep, daemon=True)
        thread.start()
        threads.append(thread)
        assert acquired.wait(10)

    yield hold
    release.set()
    for thread in threads:
        thread.join(10)


def in_forked_child(probe: Callable[[], object], timeout: float = 20) -> str:
    """Run ``probe`` in a forked child; its repr, or ``"hung"`` if it did not answer."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanup
        try:
            os.write(write, repr(probe()).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout)
        answer = os.read(read, 4096).decode() if ready else "hung"
    finally:
        os.close(read)
        if answer == "hung":
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return answer


def test_locks_held_by_our_threads_do_not_deadlock_a_forked_child(
    held_by_a_thread: Callable[[object], None],
) -> None:
    with sky.Compute(nodes=1, plugins=[sky.plugins.joblib()]):
        held_by_a_thread(skyward.safety._active_lock)
        held_by_a_thread(activation._lock)
        held_by_a_thread(feeder._ready)

        def probe() -> object:
            done = threading.Event()
            feeder.put(done.set)
            return (skyward.compute.current(), activation.active_compute(), done.wait(10))

        assert in_forked_child(probe) == repr((None, None, True))
