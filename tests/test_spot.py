"""Spot reclaims: an agent whose metadata service announces an interruption gets no new
work, its tasks finish or rerun elsewhere, and a replacement joins (issue 16).

The metadata service is a tiny HTTP server on loopback speaking IMDSv2 (``Metadata`` in
``spot_metadata.py``); local agents find it through ``SKYWARD_SPOT_ENDPOINT``
(``sky.AWS(spot=True)`` sets the real one in their HELLO). On AWS the replacement is a
new instance: ``test_aws_e2e.py``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import wait_until
from spot_tasks import at_once, held

import skyward as sky
from skyward.agent import spot

if TYPE_CHECKING:
    from spot_metadata import Metadata

pytest_plugins = ["spot_metadata"]
pytestmark = pytest.mark.timeout(120)


def pid(_: int) -> int:
    return os.getpid()


@pytest.mark.parametrize("window", [1.0, 60.0], ids=["reruns", "finishes"])
def test_spot_notice_drains_the_node_and_a_replacement_joins(
    window: float,
    metadata: Metadata,
    tmp_path: Path,
    no_agents_left: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="skyward")
    metadata.window = window
    folder = str(tmp_path)
    # max_retries=0: a reclaim is no fault of the tasks, so rerunning them costs no retry.
    with sky.Compute(nodes=2, worker=sky.Worker(2), restarts=1, max_retries=0) as compute:
        first = {n.pid: n for n in compute.nodes}
        held_futures = [compute.submit(held, (i, folder)) for i in range(8)]
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) >= 4, 30)
        metadata.armed.set()
        assert wait_until(lambda: compute.stats()["reclaims"] == 1, 30)
        assert wait_until(lambda: compute.total_slots == 2, 10)  # the drained node's are gone
        assert compute._monitor is not None
        (reclaimed,) = [n.pid for n in compute._monitor.reclaimed]
        # Work submitted after the notice never goes to the reclaimed node.
        later = [compute.submit(pid, i) for i in range(6)]
        if window < 10:  # out of time: the node is let go while its tasks are held
            assert wait_until(lambda: not first[reclaimed].alive, 30)
        Path(folder, "release").touch()
        results = [f.result(60) for f in held_futures]
        assert sorted(i for i, _ in results) == list(range(8))
        on_reclaimed = [i for i, p in results if p == reclaimed]
        if window < 10:
            assert on_reclaimed == []  # its tasks reran elsewhere
        else:
            assert on_reclaimed and compute.stats()["tasks"]["retried"] == 0  # they finished
        assert reclaimed not in {f.result(60) for f in later}
        # A replacement joins and takes work.
        assert wait_until(lambda: compute.total_slots == 4, 30), compute
        replacement = {n.pid for n in compute.nodes if n.alive} - set(first)
        assert len(replacement) == 1
        four = tmp_path / "four"
        four.mkdir()
        ran = {f.result(40) for f in [compute.submit(at_once, (str(four), 4)) for _ in range(4)]}
        assert replacement < ran  # the four slots at once: the replacement's among them
        assert compute.stats()["tasks"]["completed"] == 8 + 6 + 4  # each result once
    assert "1 spot reclaim(s)" in caplog.text


def test_aws_spot_instances_watch_the_metadata_service_on_demand_ones_do_not() -> None:
    assert sky.AWS(region="us-east-1", spot=True).agent_config() == {"spot_endpoint": spot.IMDS}
    assert sky.AWS(region="us-east-1").agent_config() == {}
    assert spot.IMDS == "http://169.254.169.254"


def test_metadata_without_a_notice_is_none_and_a_notice_is_read(metadata: Metadata) -> None:
    assert spot.fetch_notice(metadata.url) is None
    metadata.armed.set()
    notice = spot.fetch_notice(metadata.url)
    assert notice is not None and notice["action"] == "terminate"
    left = spot.seconds_left(notice, time.time())
    assert left is not None and 0 < left <= spot.MARGIN + 1
