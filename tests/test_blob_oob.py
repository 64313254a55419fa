"""Issue 15: large arguments travel out of band, from their own memory, byte-exact.

A numpy array (or ``bytes``) above the blob threshold is pickled with protocol 5:
its data is a buffer of the frame written from the array's memory, never joined
with the header nor copied per node, and the agent unpickles from slices of the
frame it read. These tests check the frame's layout on the client and that the
bytes arrive unchanged on a Local node and on an SSH node.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
from sshd_hosts import SSHDCluster

import skyward as sky
from skyward import wire
from skyward.wire import oob

pytestmark = pytest.mark.timeout(180)

PICKLE_BY_VALUE = True  # SSH hosts do not have this module (see conftest)

MiB = 1024 * 1024


def _digest(value: object) -> tuple[str, str, bool]:
    """On the node: the argument's bytes hashed (layout included), its type, whether it
    is writable."""
    flags = getattr(value, "flags", None)
    if flags is not None:
        data = value.tobytes(order="A") + bytes([flags.f_contiguous])  # type: ignore[attr-defined]
    else:
        data = bytes(value)  # type: ignore[call-overload]
    return hashlib.sha256(data).hexdigest(), type(value).__name__, bool(flags and flags.writeable)


def _expected(value: object) -> tuple[str, str]:
    digest, kind, _ = _digest(value)
    return digest, kind


def _arguments() -> list[object]:
    rng = np.random.default_rng(7)
    return [
        rng.random(6 * MiB),  # 48 MiB of float64: does not compress, goes out of band
        np.asfortranarray(rng.integers(0, 2**31, size=(1024, 2048), dtype=np.int64)),
        rng.bytes(20 * MiB),
    ]


def test_the_frame_carries_the_array_memory_itself() -> None:
    a = np.random.default_rng(0).random(4 * MiB)  # 32 MiB
    parts = oob.dumps(a)
    frame = oob.frame(oob.digest(parts), parts)
    # header + meta, in-band pickle, padding to align, the array's data
    assert len(frame) <= 4 and sum(len(p) for p in frame[:-1]) < 4096
    data = np.frombuffer(frame[-1], dtype=a.dtype)
    assert np.shares_memory(data, a), "the array's data was copied into the frame"
    body = b"".join(bytes(p) for p in frame)[wire.HEADER.size :]
    key, got = oob.split(body)
    assert key == oob.digest(parts)
    assert [bytes(p) for p in got] == [bytes(p) for p in parts]


def test_small_compressible_blobs_are_compressed_large_random_ones_are_not() -> None:
    zeros = oob.dumps(np.zeros(MiB // 4))  # 2 MiB of zeros
    packed = oob.frame("k", zeros)
    assert len(packed) == 1 and len(packed[0]) < 64 * 1024
    assert wire.HEADER.unpack(packed[0][: wire.HEADER.size])[3] == wire.FLAG_LZ4


def test_a_large_array_round_trips_byte_exact_on_a_local_node(no_agents_left: None) -> None:
    values = _arguments()
    with sky.Compute(nodes=2) as compute:
        got = [compute.submit(_digest, v).result(timeout=120) for v in values]
        assert compute._blobs.stats()["held_bytes"] == 0  # nothing kept once done
    for value, (digest, kind, writable) in zip(values, got, strict=True):
        assert (digest, kind) == _expected(value)
        assert not writable  # arrays arrive read-only, as with loky's memmaps


def test_a_large_array_round_trips_byte_exact_on_an_ssh_node(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    # The test hosts' environments have no numpy: bytes take the same out-of-band path.
    rng = np.random.default_rng(3)
    values = [rng.bytes(6 * MiB), bytearray(rng.bytes(3 * MiB))]
    sent = oob.frame("k", oob.dumps(values[0]))
    assert isinstance(sent[-1], memoryview) and len(sent[-1]) == len(values[0])  # not copied
    host = ssh_clean.specs()[0]
    provider = sky.SSH(
        [host],  # type: ignore[list-item]
        key_filename=ssh_clean.key_filename,
        known_hosts=ssh_clean.known_hosts,
        python=sys.executable,
        env_root=ssh_env_root,
    )
    image = sky.Image(wheelhouse=ssh_wheelhouse)
    with sky.Compute(provider=provider, nodes=1, image=image) as compute:
        got = [compute.submit(_sha256, v).result(timeout=120) for v in values]
    assert got == [(hashlib.sha256(v).hexdigest(), type(v).__name__) for v in values]


def _sha256(value: bytes | bytearray) -> tuple[str, str]:
    return hashlib.sha256(value).hexdigest(), type(value).__name__
