"""First error and timeout stop the rest of a Parallel call on the cluster (process executor)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from conftest import wait_until
from joblib import Parallel, delayed

import skyward as sky

SLOTS = 3
TASK_SECONDS = 1.5

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster():
    with sky.Compute(
        nodes=1,
        worker=sky.Worker(concurrency=SLOTS, executor="process"),
        plugins=[sky.plugins.joblib()],
    ) as compute:
        yield compute


def marked(i: int, folder: str, failing: int | None, wait_for: int) -> int:
    """Leave start/end marker files; task ``failing`` raises once ``wait_for`` tasks started."""
    Path(folder, f"start-{i}").touch()
    if i == failing:
        wait_until(lambda: len(list(Path(folder).glob("start-*"))) >= wait_for, 10)
        raise ValueError(f"task {i} failed")
    time.sleep(TASK_SECONDS)
    Path(folder, f"end-{i}").touch()
    return i


def markers(folder: Path, kind: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in folder.glob(f"{kind}-*")}


def settle_after(started: float) -> None:
    """Wait until any task that was not stopped would have written its end marker."""
    time.sleep(max(0.0, started + TASK_SECONDS + 0.7 - time.monotonic()))


def test_first_error_cancels_the_rest_of_the_call(cluster, tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match="task 0 failed"):
        # n_jobs below the slot count: nothing beyond the two running batches is sent.
        Parallel(n_jobs=2, batch_size=1)(delayed(marked)(i, str(tmp_path), 0, 2) for i in range(12))
    settle_after(started)
    assert markers(tmp_path, "start") == {0, 1}  # no later task of the call ever started
    assert markers(tmp_path, "end") == set()  # the running one was stopped
    assert Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def test_first_error_with_all_slots_stops_queued_work(cluster, tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match="task 0 failed"):
        Parallel(n_jobs=-1, batch_size=1)(
            delayed(marked)(i, str(tmp_path), 0, SLOTS) for i in range(20)
        )
    settle_after(started)
    # Only the batches already on the node (one per slot plus its prefetch) can have
    # started; everything the client still held was dropped.
    assert markers(tmp_path, "start") <= set(range(SLOTS + 1))
    assert markers(tmp_path, "end") == set()


def test_timeout_raises_and_stops_running_tasks(cluster, tmp_path):
    # Slots killed by the previous tests are back once every slot has run a task.
    assert Parallel(n_jobs=SLOTS, batch_size=1)(delayed(abs)(-i) for i in range(SLOTS)) == [0, 1, 2]
    started = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=2, batch_size=1, timeout=1.0)(
            delayed(marked)(i, str(tmp_path), None, 0) for i in range(6)
        )
    settle_after(started)
    assert markers(tmp_path, "start") == {0, 1}
    assert markers(tmp_path, "end") == set()
