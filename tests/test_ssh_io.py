"""Issue 15, SSH channels on the client's one I/O loop: frames far larger than the SSH
window travel intact both ways (the writer waits for window on a loop timer, the
reader fills large bodies in place) and no node is declared lost meanwhile; the loop's
timers run in order on its thread."""

from __future__ import annotations

import hashlib
import os
import sys
import threading

import pytest
from sshd_hosts import SSHDCluster

import skyward as sky
from skyward import io as skyio

pytestmark = pytest.mark.timeout(180)

PICKLE_BY_VALUE = True  # see conftest: the SSH hosts do not have this module

SIZE = 24 << 20  # above the 16 MiB window the client offers and the 2 MiB sshd offers


def digest_and_echo(data: bytes) -> tuple[str, bytes]:
    """The digest of what arrived, and as many fresh bytes back."""
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(data).digest() * (len(data) // 32)


def test_frames_larger_than_the_ssh_window_travel_both_ways(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    provider = sky.SSH(
        ssh_clean.specs()[:2],
        key_filename=ssh_clean.key_filename,
        known_hosts=ssh_clean.known_hosts,
        python=sys.executable,
        env_root=ssh_env_root,
    )
    image = sky.Image(wheelhouse=ssh_wheelhouse)
    blobs = [os.urandom(SIZE), os.urandom(SIZE)]
    with sky.Compute(provider, nodes=2, image=image, progress=False) as compute:
        results = list(compute.map(digest_and_echo, blobs))
        stats = compute.stats()
        nodes = [(node.alive, node.heartbeats) for node in compute.nodes]
    for blob, (seen, echoed) in zip(blobs, results, strict=True):
        expected = hashlib.sha256(blob).digest()
        assert seen == expected.hex()
        assert echoed == expected * (SIZE // 32)
    assert all(alive for alive, _ in nodes), f"a node was lost while large frames moved: {stats}"


def test_loop_timers_run_in_order_on_the_loop_thread() -> None:
    loop = skyio.loop()
    ran: list[tuple[str, bool]] = []
    done = threading.Event()

    def record(name: str) -> None:
        ran.append((name, loop.on_loop))
        if len(ran) == 3:
            done.set()

    loop.call_later(0.05, lambda: record("third"))
    loop.call_later(0.0, lambda: record("first"))
    loop.call_later(0.02, lambda: record("second"))
    assert done.wait(5)
    assert ran == [("first", True), ("second", True), ("third", True)]
