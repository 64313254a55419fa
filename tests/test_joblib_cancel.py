"""First error and timeout stop the rest of a Parallel call on the cluster (process executor)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from joblib import Parallel, delayed

import skyward as sky

SLOTS = 3
HOLD_SECONDS = 60  # a task not stopped holds its slot this long: far beyond every wait below

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
    """Leave a start marker holding this process's pid, then hold (bounded) and leave an
    end marker; task ``failing`` raises once ``wait_for`` tasks started instead."""
    Path(folder, f"start-{i}").write_text(str(os.getpid()))
    if i == failing:
        wait_until(lambda: len(list(Path(folder).glob("start-*"))) >= wait_for, 10)
        raise ValueError(f"task {i} failed")
    wait_until(lambda: False, HOLD_SECONDS, step=0.05)
    Path(folder, f"end-{i}").touch()
    return i


def together(folder: str, i: int, count: int) -> int:
    """Mark this task running; wait (bounded) until ``count`` tasks run at once."""
    Path(folder, f"up-{i}").touch()
    wait_until(lambda: len(list(Path(folder).glob("up-*"))) >= count, 30)
    return len(list(Path(folder).glob("up-*")))


def markers(folder: Path, kind: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in folder.glob(f"{kind}-*")}


def all_slots_up(folder: Path) -> None:
    """Wait until every slot runs (a slot killed by a cancel is back): SLOTS tasks must
    be running at once for any of them to return SLOTS."""
    folder.mkdir()
    out = Parallel(n_jobs=SLOTS, batch_size=1)(
        delayed(together)(str(folder), i, SLOTS) for i in range(SLOTS)
    )
    assert out == [SLOTS] * SLOTS


def settled(compute: sky.Compute, folder: Path, failing: int | None) -> None:
    """Wait until no task of the call is on the cluster any more: each one that started
    was stopped (its process is gone) or dropped before it started, so the markers are
    final. A task that was not stopped would hold its slot far longer than this waits."""
    assert wait_until(
        lambda: all(n["in_flight"] == 0 for n in compute.stats()["nodes"].values()), 30
    ), "a running task of the aborted call was not stopped"
    pids = {i: folder.joinpath(f"start-{i}").read_text() for i in markers(folder, "start")}
    stopped = [int(pid) for i, pid in pids.items() if i != failing and pid]  # "": killed early
    assert wait_until(lambda: not any(psutil.pid_exists(pid) for pid in stopped), 10)


def test_first_error_cancels_the_rest_of_the_call(cluster, tmp_path):
    all_slots_up(tmp_path / "warm")
    with pytest.raises(ValueError, match="task 0 failed"):
        # n_jobs below the slot count: nothing beyond the two running batches is sent.
        Parallel(n_jobs=2, batch_size=1)(delayed(marked)(i, str(tmp_path), 0, 2) for i in range(12))
    settled(cluster, tmp_path, failing=0)
    assert markers(tmp_path, "start") == {0, 1}  # no later task of the call ever started
    assert markers(tmp_path, "end") == set()  # the running one was stopped
    assert Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(4)) == [0, 1, 2, 3]


def test_first_error_with_all_slots_stops_queued_work(cluster, tmp_path):
    all_slots_up(tmp_path / "warm")
    with pytest.raises(ValueError, match="task 0 failed"):
        Parallel(n_jobs=-1, batch_size=1)(
            delayed(marked)(i, str(tmp_path), 0, SLOTS) for i in range(20)
        )
    settled(cluster, tmp_path, failing=0)
    # Only the batches already on the node (one per slot plus its prefetch) can have
    # started; everything the client still held was dropped.
    assert markers(tmp_path, "start") <= set(range(SLOTS + 1))
    assert markers(tmp_path, "end") == set()


def test_timeout_raises_and_stops_running_tasks(cluster, tmp_path):
    all_slots_up(tmp_path / "warm")
    with pytest.raises(multiprocessing.TimeoutError):
        Parallel(n_jobs=2, batch_size=1, timeout=1.0)(
            delayed(marked)(i, str(tmp_path), None, 0) for i in range(6)
        )
    settled(cluster, tmp_path, failing=None)
    assert markers(tmp_path, "start") == {0, 1}
    assert markers(tmp_path, "end") == set()
