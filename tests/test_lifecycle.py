"""Lifecycle log lines, the exit summary and the terminal progress display."""

from __future__ import annotations

import io
import logging
import os
import pty
import subprocess
import sys
import textwrap
import time

import pytest

import skyward as sky
from skyward.progress import Progress

pytestmark = pytest.mark.timeout(60)


def test_lifecycle_is_logged_with_timings_and_an_exit_summary(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="skyward")
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2)) as compute:
        assert sorted(compute.map(abs, range(-10, 10))) == sorted(abs(i) for i in range(-10, 10))
        cluster = compute.cluster_id
    messages = [r.getMessage() for r in caplog.records if r.name == "skyward"]
    text = "\n".join(messages)
    assert "provisioned 2 node(s) in" in text
    for name in ("node-0", "node-1"):
        assert any(m.startswith(f"node {name} ready in") and "pid" in m for m in messages)
    assert f"cluster {cluster} ready: 2 node(s), 4 slot(s) in" in text
    summary = next(m for m in messages if m.startswith(f"cluster {cluster} summary:"))
    assert "20 task(s) done, 0 retried, 0 failed" in summary
    assert "sent " in summary and "received " in summary
    assert "utilization node-0 " in summary and "node-1 " in summary
    assert any(m.startswith(f"cluster {cluster} stopped in") for m in messages)
    assert messages.index(summary) < len(messages) - 1  # the summary comes before "stopped"


def test_stats_report_tasks_bytes_and_busy_time() -> None:
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2)) as compute:
        list(compute.map(time.sleep, [0.02] * 50))  # each task is busy 20 ms at least
        stats = compute.stats(refresh=True)
    node = stats["nodes"]["node-0"]
    assert stats["tasks"]["completed"] == 50
    assert node["tasks_done"] == 50 and node["bytes_sent"] > 0 and node["bytes_received"] > 0
    assert node["busy_seconds"] >= 0.99  # 50 x 20 ms, less a rounding margin


SCRIPT = textwrap.dedent(
    """
    import skyward as sky
    with sky.Compute(nodes=1, progress=True) as compute:
        assert list(compute.map(abs, range(-20, 0))) == list(range(20, 0, -1))
    print("done")
    """
)


def test_progress_display_is_silent_when_not_a_terminal() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "done\n"
    assert "\r" not in result.stderr and "skyward:" not in result.stderr


def test_progress_display_draws_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=follower,
            timeout=60, check=True,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    drawn = b"".join(chunks).decode()
    assert proc.stdout == b"done\n"
    assert "skyward: " in drawn and "node(s) ready" in drawn
    assert "20/20 tasks done" in drawn


def test_progress_object_is_disabled_for_non_tty_streams() -> None:
    stream = io.StringIO()
    display = Progress(stream)
    display.show(lambda: "x")
    display.close()
    assert not display.enabled and stream.getvalue() == ""
