"""Issue 15, one I/O loop for all nodes: the client's threads do not grow with its nodes
(Local, and SSH but for paramiko's transport thread per connection), and the loop's
frame parser keeps the frame limits."""

from __future__ import annotations

import os
import sys
import threading
import tracemalloc

import paramiko
import pytest
from sshd_hosts import SSHDCluster

import skyward as sky
from skyward import wire
from skyward.errors import ProtocolError
from skyward.wire import Kind

PICKLE_BY_VALUE = True  # see conftest: the SSH hosts do not have this module


def pid_of(_: object = None) -> int:
    return os.getpid()


def client_threads(nodes: int) -> int:
    """The client's threads while ``nodes`` Local nodes are up and every one has run a task."""
    with sky.Compute(nodes=nodes, worker=sky.Worker(concurrency=1), progress=False) as compute:
        pids = set(compute.map(pid_of, range(nodes * 4)))
        assert pids <= {node.pid for node in compute.nodes}
        return threading.active_count()


def test_client_threads_do_not_grow_with_nodes(no_agents_left: None) -> None:
    few = client_threads(5)
    many = client_threads(50)
    assert many <= few, f"{many} client threads with 50 nodes, {few} with 5"


def ssh_client_threads(
    cluster: SSHDCluster, env_root: str, wheelhouse: str, nodes: int
) -> tuple[int, int]:
    """(paramiko transport threads, every other client thread) while ``nodes`` SSH nodes
    (the loopback hosts, each used several times) are up and every one has run a task."""
    hosts = (cluster.specs() * nodes)[:nodes]
    provider = sky.SSH(
        hosts,
        key_filename=cluster.key_filename,
        known_hosts=cluster.known_hosts,
        python=sys.executable,
        env_root=env_root,
    )
    image = sky.Image(wheelhouse=wheelhouse)
    worker = sky.Worker(concurrency=1)
    with sky.Compute(provider, nodes=nodes, worker=worker, image=image, progress=False) as c:
        assert len(set(c.map(pid_of, range(nodes * 4)))) == nodes
        threads = threading.enumerate()
    transports = sum(isinstance(t, paramiko.Transport) for t in threads)
    return transports, len(threads) - transports


@pytest.mark.timeout(240)
def test_ssh_client_threads_grow_only_by_paramiko_transports(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    few = ssh_client_threads(ssh_clean, ssh_env_root, ssh_wheelhouse, 2)
    many = ssh_client_threads(ssh_clean, ssh_env_root, ssh_wheelhouse, 6)
    assert few[0] == 2 and many[0] == 6, f"transport threads: {few[0]} for 2 nodes, {many[0]} for 6"
    assert many[1] <= few[1], f"{many[1]} other client threads with 6 SSH nodes, {few[1]} with 2"


def frames_of(data: bytes, piece: int) -> list[wire.Frame]:
    parser = wire.FrameParser()
    out: list[wire.Frame] = []
    offset = 0
    while offset < len(data):
        target = parser.target()
        if target is not None:
            n = min(len(target), piece, len(data) - offset)
            target[:n] = data[offset : offset + n]
            out += parser.filled(n)
        else:
            out += parser.feed(data[offset : offset + piece])
            n = min(piece, len(data) - offset)
        offset += n
    parser.end()
    return out


@pytest.mark.parametrize("piece", [13, 4096, 1 << 22])
def test_parser_cuts_frames_whatever_the_pieces(piece: int) -> None:
    large = os.urandom(3 << 20)  # incompressible: read into its own buffer
    data = (
        wire.encode_obj(Kind.HEARTBEAT, None)
        + wire.encode(Kind.BLOB, large)
        + wire.encode(Kind.RESULT, b"x" * 200_000)  # lz4-compressed
    )
    frames = frames_of(data, piece)
    assert [kind for kind, _, _ in frames] == [Kind.HEARTBEAT, Kind.BLOB, Kind.RESULT]
    assert bytes(frames[1][1]) == large
    assert frames[2][1] == b"x" * 200_000
    assert sum(size for _, _, size in frames) == len(data)


def test_parser_refuses_truncated_and_oversized_frames() -> None:
    frame = wire.encode(Kind.BLOB, os.urandom(2 << 20))
    with pytest.raises(ProtocolError, match="ended inside a BLOB frame"):
        frames_of(frame[:-1], 1 << 16)
    with pytest.raises(ProtocolError, match="ended inside a frame header"):
        frames_of(frame[:5], 1 << 16)
    with pytest.raises(ProtocolError, match="above the limit"):
        wire.FrameParser(limit=1 << 20).feed(frame[: wire.HEADER.size])


def test_outbox_writes_buffer_lists_without_joining_them() -> None:
    """The agent's writer hands a frame's buffers to the pipe as they are: sending a
    16 MiB buffer allocates nothing near its size (a join would copy all of it)."""
    payload = bytearray(os.urandom(1 << 20) * 16)
    header = wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL, Kind.BLOB, 0, len(payload))
    small = wire.encode_obj(Kind.HEARTBEAT, {"n": 1})
    expected = len(small) + len(header) + len(payload) + len(small)
    received = bytearray(expected)
    read_fd, write_fd = os.pipe()
    got = 0

    def drain() -> None:
        nonlocal got
        view = memoryview(received)
        while got < expected and (n := os.readv(read_fd, [view[got:]])):
            got += n

    reader = threading.Thread(target=drain)
    reader.start()
    broken: list[bool] = []
    with os.fdopen(write_fd, "wb") as stream:
        outbox = wire.Outbox(stream, lambda: broken.append(True))
        tracemalloc.start()
        try:
            outbox.put(small)
            outbox.put([header, memoryview(payload)])
            outbox.put(small)
            reader.join(30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            outbox.close()
    os.close(read_fd)
    assert not reader.is_alive() and not broken and got == expected
    frames = frames_of(bytes(received), 1 << 16)
    assert [kind for kind, _, _ in frames] == [Kind.HEARTBEAT, Kind.BLOB, Kind.HEARTBEAT]
    assert frames[1][1] == payload
    assert outbox.sent == expected
    assert peak < len(payload) // 4, f"{peak} bytes allocated while writing {len(payload)}"
