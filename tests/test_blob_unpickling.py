"""The agent unpickles blobs off its serve loop (issue 15, priority 0).

Unpickling a blob can import a heavy package for seconds (scikit-learn under
load: more than ten). Done on the agent's serve loop, that kept heartbeats
unanswered and a healthy node was declared lost; the first task that needs the
blob unpickles it on its own slot thread instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import wait_until

import skyward as sky

pytestmark = pytest.mark.timeout(120)


class SlowToLoad:
    """Unpickles only once ``release`` exists in ``folder`` (leaves ``loading`` there first)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __getstate__(self) -> dict[str, str]:
        return {"folder": self.folder}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.folder = state["folder"]
        Path(self.folder, "loading").touch()
        release = Path(self.folder, "release")
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.01)


def test_heartbeats_are_answered_while_a_blob_unpickles(
    tmp_path: Path, no_agents_left: None
) -> None:
    timeout = 1.0
    slow = SlowToLoad(str(tmp_path))

    def task() -> str:  # a closure: it travels by value, as a blob holding ``slow``
        return slow.folder

    with sky.Compute(nodes=1, heartbeat_timeout=timeout, restarts=0) as compute:
        node = compute.nodes[0]
        future = compute.submit(task)
        try:
            # Before the fix the node was lost here already: importing this module to
            # unpickle the blob (it imports pytest: over a second) blocked the serve loop.
            assert wait_until(lambda: (tmp_path / "loading").exists(), 30), (
                "the blob never started unpickling on a live node"
            )
            heard = node.heartbeats
            # The client asks every heartbeat_timeout / 5: fifteen answers span three
            # heartbeat timeouts, all while the blob is still unpickling.
            answered = wait_until(lambda: node.heartbeats >= heard + 15, 30)
            assert answered, "no heartbeat was answered while a blob unpickled"
            assert not future.done()
            assert node.alive and compute.nodes[0] is node
        finally:
            (tmp_path / "release").touch()
        assert future.result(timeout=30) == str(tmp_path)
        assert compute.stats()["tasks"]["retried"] == 0
