"""The status line counts the user's tasks, not Skyward's batches, with an ETA once the
total is known; ``stats()["progress"]`` has the same counts (issue 15, done-when 5).

The client runs in a pseudo-terminal (the status line draws only on a terminal).
Its last task waits for a marker file that the test writes once it has seen an ETA,
so the ETA is on screen while a task is still running, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import skyward as sky
from skyward.progress import TaskCounts, duration

pytestmark = pytest.mark.timeout(180)

CLIENT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import skyward as sky
    from joblib import Parallel, delayed

    marker = Path(sys.argv[1])

    def task(i):
        if i == 399:  # the last task runs until the test has seen the ETA (bounded)
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return i

    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=4), progress=True,
                     plugins=[sky.plugins.joblib()]) as compute:
        out = Parallel(n_jobs=-1)(delayed(task)(i) for i in range(400))
        assert out == list(range(400))
        print(json.dumps({"progress": compute.stats()["progress"],
                          "batches": compute.stats()["tasks"]["submitted"]}), flush=True)
    """
)

COUNT = re.compile(r"(\d+)/(\d+\+?) tasks done")


def test_a_400_task_parallel_shows_400_tasks_and_an_eta(tmp_path: Path) -> None:
    marker = tmp_path / "release"
    master, slave = pty.openpty()
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(marker)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    screen = ""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the client closed the terminal
                    break
                if not chunk:
                    break
                screen += chunk.decode("utf-8", "replace")
            if not marker.exists() and re.search(r"/400 tasks done[^\r\n]*ETA", screen):
                marker.touch()
            if client.poll() is not None and not ready:
                break
        out, _ = client.communicate(timeout=30)
    finally:
        marker.touch()
        if client.poll() is None:
            client.kill()
            client.communicate()
        os.close(master)
    assert client.returncode == 0, screen[-3000:]
    totals = {total for _, total in COUNT.findall(screen)}
    assert totals, f"no task count on the status line: {screen!r}"
    # Known totals are the user's 400 tasks; before joblib knows, "N+" tasks so far.
    assert {t for t in totals if not t.endswith("+")} == {"400"}, totals
    assert re.search(r"/400 tasks done[^\r\n]*ETA \d", screen), screen[-3000:]
    assert "400/400 tasks done" in screen
    stats = json.loads(out.strip().splitlines()[-1])
    progress = stats["progress"]
    assert (progress["submitted"], progress["done"], progress["total"]) == (400, 400, 400)
    assert stats["batches"] < 400  # joblib batched them: the count above is not batches


def test_stats_counts_direct_submits_one_task_each() -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2)) as compute:
        futures = [compute.submit(abs, -i) for i in range(10)]
        failing = compute.submit(int, "not a number")
        assert [f.result() for f in futures] == list(range(10))
        with pytest.raises(ValueError):
            failing.result()
        progress = compute.stats()["progress"]
    assert (progress["submitted"], progress["done"], progress["failed"]) == (11, 11, 1)
    assert progress["total"] == 11


def test_map_chunks_count_as_their_items() -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2)) as compute:
        assert list(compute.map(abs, range(-50, 0), chunksize=8)) == list(range(50, 0, -1))
        progress = compute.stats()["progress"]
    assert (progress["submitted"], progress["done"], progress["total"]) == (50, 50, 50)


def test_total_unknown_while_a_producer_does_not_know_it() -> None:
    counts = TaskCounts()
    remaining: list[int | None] = [None]
    counts.follow("call", lambda: remaining[0])

    class Batch:
        task_count = 5

    counts.add(Batch())
    assert counts.total() is None
    assert "0/5+ tasks done" in counts.line()
    remaining[0] = 3
    assert counts.total() == 8
    counts.unfollow("call")
    assert counts.total() == 5
    assert [duration(s) for s in (7, 125, 3720)] == ["7s", "2m05s", "1h02m"]
