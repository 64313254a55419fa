"""Reading frames is bounded (issues 14 and 15): a stream that ends inside a frame is an
error, a frame length above the limit is refused before anything is allocated for it, and
lz4 decompression produces no more than the declared size, itself within the limit."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

import lz4.frame
import pytest

from skyward import wire
from skyward.wire import Kind, ProtocolError

MiB = 1 << 20
LIMIT_ENV = "SKYWARD_MAX_FRAME_BYTES"


@pytest.fixture
def limit(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Set the frame limit of this process (read at each frame)."""
    return lambda size: monkeypatch.setenv(LIMIT_ENV, str(size))


class RecordingStream(io.RawIOBase):
    """A byte stream that records the size of every read asked of it."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.asked: list[int] = []

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.asked.append(n)
        return self._data.read(n)


def header(kind: Kind, length: int, flags: int = 0) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL, kind, flags, length)


def test_end_of_stream_between_frames_is_the_clean_end() -> None:
    frame = wire.encode_obj(Kind.HEARTBEAT, None)
    stream = io.BytesIO(frame + frame)
    assert wire.read_frame(stream) is not None
    assert wire.read_frame(stream) is not None
    assert wire.read_frame(stream) is None


@pytest.mark.parametrize("cut", [1, wire.HEADER.size - 1, wire.HEADER.size, -1])
def test_a_stream_that_ends_inside_a_frame_is_an_error(cut: int) -> None:
    frame = wire.encode_obj(Kind.RESULT, [(1, 0, b"x" * 1000)])
    stream = io.BytesIO(frame + frame[:cut])
    assert wire.read_frame(stream) is not None
    with pytest.raises(ProtocolError, match=r"stream ended inside a (frame header|RESULT frame)"):
        wire.read_frame(stream)


def test_a_length_above_the_limit_is_refused_before_reading_the_body(
    limit: Callable[[int], None],
) -> None:
    limit(64 * MiB)
    stream = RecordingStream(header(Kind.BLOB, 1 << 50) + b"garbage")
    with pytest.raises(ProtocolError, match=r"BLOB frame of 1125899906842624 bytes is above the "):
        wire.read_frame(stream)
    assert stream.asked == [wire.HEADER.size]  # the body was never asked for


def test_the_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = wire.encode(Kind.TASK, b"x" * 5000, compress=False)
    monkeypatch.setenv(LIMIT_ENV, "4096")
    with pytest.raises(ProtocolError, match=r"limit of 4096 bytes \(SKYWARD_MAX_FRAME_BYTES"):
        wire.read_frame(io.BytesIO(frame))
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match=r"SKYWARD_MAX_FRAME_BYTES='lots' is not a positive"):
        wire.read_frame(io.BytesIO(frame))
    monkeypatch.delenv(LIMIT_ENV)
    assert wire.read_frame(io.BytesIO(frame)) is not None


def test_a_decompression_bomb_is_refused_without_inflating_it(
    limit: Callable[[int], None],
) -> None:
    limit(4 * MiB)
    bomb = lz4.frame.compress(bytes(64 * MiB), compression_level=0)
    assert len(bomb) < MiB  # small on the wire, within the limit below
    frame = header(Kind.TASK, len(bomb), wire.FLAG_LZ4) + bomb
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"decompresses to 67108864 bytes, above the"):
            wire.read_frame(io.BytesIO(frame))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB  # tracemalloc sees lz4's output buffers: inflating it takes 64


def test_decompression_stops_at_the_declared_size(limit: Callable[[int], None]) -> None:
    limit(64 * MiB)
    # A body whose first lz4 frame declares 10 bytes and whose rest inflates further.
    body = lz4.frame.compress(b"a" * 10) + lz4.frame.compress(bytes(8 * MiB))
    frame = header(Kind.TASK, len(body), wire.FLAG_LZ4) + body
    with pytest.raises(ProtocolError, match="does not match its declared size of 10 bytes"):
        wire.read_frame(io.BytesIO(frame))
    unsized = lz4.frame.compress(b"b" * 100_000, store_size=False)
    frame = header(Kind.TASK, len(unsized), wire.FLAG_LZ4) + unsized
    with pytest.raises(ProtocolError, match="does not declare its size"):
        wire.read_frame(io.BytesIO(frame))


def test_compressed_frames_within_the_limit_round_trip(limit: Callable[[int], None]) -> None:
    body = b"abc" * 100_000
    limit(len(body))  # the decompressed size counts, and may reach the limit
    frame = wire.encode(Kind.TASK, body)
    assert wire.HEADER.unpack(frame[: wire.HEADER.size])[3] & wire.FLAG_LZ4
    kind, decoded, size = wire.read_frame(io.BytesIO(frame))  # type: ignore[misc]
    assert (kind, decoded, size) == (Kind.TASK, body, len(frame))


def test_the_agent_refuses_an_oversized_frame_and_says_why() -> None:
    env = dict(os.environ, **{LIMIT_ENV: str(MiB)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "skyward.agent"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(wire.encode_obj(Kind.HELLO, {"concurrency": 1}))
        proc.stdin.flush()
        hello = wire.read_frame(proc.stdout)
        assert hello is not None and hello[0] == Kind.HELLO
        blob = pickle.dumps(("key", os.urandom(2 * MiB)))
        try:
            proc.stdin.write(wire.encode(Kind.BLOB, blob))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it stopped reading at the header
        stderr = proc.stderr.read()  # until it exits: its stdin is closed either way
        code = proc.wait(60)
    finally:
        proc.kill()
        proc.wait(10)
    assert code == 2
    assert b"BLOB frame of" in stderr and b"limit of 1048576 bytes" in stderr, stderr
