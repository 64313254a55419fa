"""Large-argument deduplication, measured through ``compute.stats()`` on Local agents.

scikit-learn passes the same ``X`` and ``y`` (and the same CV index arrays) to
every fit; each must reach a node once, as a content-addressed blob, and the
agents' caches must serve the other fits.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import wait_until
from sklearn.model_selection import GridSearchCV
from sklearn.naive_bayes import GaussianNB

import skyward as sky
from skyward import wire
from skyward.channel import PipeChannel
from skyward.node import Node
from skyward.scheduler import Scheduler

PER_FIT_OVERHEAD = 32 * 1024  # estimator, parameters, scorer, sklearn's config: ~14 KB seen


def _node_stats(compute: sky.Compute) -> dict[str, dict[str, Any]]:
    return compute.stats(refresh=True)["nodes"]


@pytest.mark.timeout(240)
def test_grid_search_sends_a_50mb_x_to_each_node_once(no_agents_left: None) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((25_000, 256))  # 51.2 MB
    y = (X[:, :4].sum(axis=1) > 0).astype(np.int64)
    grid = {"var_smoothing": np.logspace(-12, -3, 20)}
    with sky.Compute(
        nodes=2, worker=sky.Worker(concurrency=2), plugins=[sky.plugins.sklearn()]
    ) as compute:
        search = GridSearchCV(GaussianNB(), grid, cv=5, n_jobs=-1).fit(X, y)
        nodes = _node_stats(compute)
        fits = compute.stats()["tasks"]["completed"]
    assert len(search.cv_results_["mean_test_score"]) == 20
    data = X.nbytes + y.nbytes
    fits_total = 20 * 5
    for name, node in nodes.items():
        assert node["tasks_done"] > 0, f"{name} ran nothing: {nodes}"
        limit = 1.05 * data + fits_total * PER_FIT_OVERHEAD
        assert node["bytes_sent"] <= limit, (
            f"{name}: {node['bytes_sent'] / data:.3f} x size(X)+size(y) sent over {fits} tasks"
        )
        # X once, y once, and at most the 5 train/test index pairs, never per fit.
        assert node["blobs_sent"] <= 2 + 2 * 5, node
        assert node["blob_bytes_sent"] < X.nbytes + 2 * y.nbytes + 5 * y.nbytes, node
        assert node["cache_hits"] > node["tasks_done"], node
        assert node["cache_misses"] == 0, node


def test_same_medium_array_becomes_a_blob_when_sent_again() -> None:
    a = np.arange(20_000, dtype=np.float64)  # 160 KB: below the 1 MiB blob threshold
    once = np.arange(20_000, dtype=np.float64) + 1
    with sky.Compute(nodes=1) as compute:
        assert compute.submit(np.sum, once).result() == once.sum()
        assert _node_stats(compute)["node-0"]["blobs_sent"] == 0  # sent once: inline
        for _ in range(10):
            assert compute.submit(np.sum, a).result() == a.sum()
        node = _node_stats(compute)["node-0"]
    assert node["blobs_sent"] == 1
    # inline until the same content is sent twice, then one blob: 3x the array, not 11x
    assert node["bytes_sent"] < 4 * a.nbytes + once.nbytes
    assert node["cache_hits"] >= 8


def test_a_medium_buffer_refilled_in_place_never_sends_stale_content() -> None:
    buffer = np.zeros(10_000)  # 80 KB: deduplicated when resent, but hashed on every send
    with sky.Compute(nodes=1) as compute:
        for i in range(6):
            buffer[:] = i
            assert compute.submit(np.sum, buffer).result() == i * 10_000
        for _ in range(3):
            assert compute.submit(np.sum, buffer).result() == 5 * 10_000
        node = _node_stats(compute)["node-0"]
    assert node["blobs_sent"] == 1  # only the content that stopped changing


def test_equal_content_in_distinct_objects_travels_once() -> None:
    first = np.ones(300_000)  # 2.4 MB
    copies = [first.copy() for _ in range(4)]
    with sky.Compute(nodes=1) as compute:
        totals = [compute.submit(np.sum, c).result() for c in [first, *copies]]
        node = _node_stats(compute)["node-0"]
    assert totals == [300_000.0] * 5
    assert node["blobs_sent"] == 1
    assert node["blob_bytes_sent"] < 1.01 * first.nbytes


def test_blob_the_worker_cannot_unpickle_fails_its_task_not_the_agent(tmp_path: Path) -> None:
    (tmp_path / "client_only_types.py").write_text(
        textwrap.dedent(
            """
            class Point:
                def __init__(self, x):
                    self.x = x
            """
        )
    )
    with sky.Compute(nodes=1) as compute:
        # Agents inherited the client's sys.path when they started: this module is new.
        sys.path.insert(0, str(tmp_path))
        try:
            import client_only_types

            points = np.empty(wire.BLOB_THRESHOLD // 8, dtype=object)
            points[:] = [client_only_types.Point(1)]
            with pytest.raises(ModuleNotFoundError, match="client_only_types"):
                compute.submit(len, points).result(timeout=60)
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("client_only_types", None)
        assert compute.submit(sum, [1, 2]).result(timeout=60) == 3
        assert all(node.alive for node in compute.nodes)
        assert compute.stats()["tasks"]["retried"] == 0


@pytest.mark.timeout(120)
def test_agent_asks_again_for_a_blob_its_cache_evicted(no_agents_left: None) -> None:
    # Compute does not expose the agent's cache size: drive one node directly with a
    # 3 MiB cache, so that a second 2 MiB blob evicts the first.
    registry = wire.BlobRegistry()
    node = Node(0, PipeChannel("node-0", [sys.executable, "-m", "skyward.agent"]), 1, registry)
    scheduler = Scheduler(max_retries=0)
    try:
        config = {"concurrency": 1, "executor": "thread", "env": {}, "node": "node-0"}
        node.handshake({**config, "blob_cache_bytes": 3 * 2**20}, timeout=60)
        node.start(scheduler)
        scheduler.add_nodes([node])

        def total(array: np.ndarray) -> float:
            payload, keys = wire.dumps_task(np.sum, (array,), {}, registry)
            return float(scheduler.submit(payload, keys, "sum").result(timeout=60))

        ones, twos = np.full(2**18, 1.0), np.full(2**18, 2.0)  # 2 MiB each
        assert total(ones) == 2**18
        assert total(twos) == 2 * 2**18  # evicts `ones` on the agent
        assert node.blob_requests == 0
        assert total(ones) == 2**18  # sent once by the client, so the agent must ask
        assert node.blob_requests == 1 and node.blobs_sent == 3
        heartbeats = node.heartbeats
        node.heartbeat()
        assert wait_until(lambda: node.heartbeats > heartbeats, 10)
        assert node.agent_stats["cache_misses"] == 1, node.agent_stats
        assert node.agent_stats["blobs_received"] == 3, node.agent_stats
    finally:
        scheduler.close(cancel=True)
        node.stop()
