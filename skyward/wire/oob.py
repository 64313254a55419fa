"""A blob's bytes: an object pickled with protocol 5, its large buffers out of band.

Pickled with a ``buffer_callback``, a numpy array (a DataFrame's blocks, a ``bytes``)
becomes a small in-band pickle plus its own memory as raw buffers, never copied.
A ``BLOB`` frame's body lays them out one after the other::

    meta length (4 bytes) | meta: pickle of (key, [length of each part]) | in-band | buffer...

each buffer padded to start at a multiple of :data:`ALIGN` bytes from the body's
start, so an array unpickled from it is aligned (numpy's fast paths need that).

The client writes that body as a list of buffers (header and meta, then the
object's memory): nothing is concatenated, nothing copied per node. Blobs that
compress go through lz4 instead (the frame's ``FLAG_LZ4``, streamed over the parts
without joining them): small ones when they shrink at all, large ones only when
they shrink to a quarter, since the client holds the compressed copy. The agent reads the body into
one buffer and unpickles from slices of it (:func:`split`), so an array received
points into that buffer.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import lz4.frame

from skyward.errors import ProtocolError
from skyward.wire.frames import FLAG_LZ4, HEADER, MAGIC, PICKLE_PROTOCOL, PROTOCOL, Kind

META = struct.Struct("!I")
ALIGN = 64
"""Out-of-band buffers start at multiples of this from the body's start (zero padding)."""
COMPRESS_MAX = 16 * 1024 * 1024
"""Blobs up to this size go through lz4 when samples of them compress at all."""
WELL_COMPRESSED = 0.25
"""Larger blobs only when their samples shrink below this ratio: the compressed copy
the client holds costs memory, so it must be small."""

Part = bytes | memoryview


class _Raw:
    """``bytes``/``bytearray`` pickled out of band (pickle copies them in band otherwise)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


def dumps(
    obj: object, pickler: Callable[[io.BytesIO, Callable[[Any], None]], Any] | None = None
) -> list[Part]:
    """``obj`` as ``[in-band pickle, buffer, ...]``, the buffers views of its own memory.

    ``pickler(file, buffer_callback)`` makes the pickler (default: cloudpickle's).
    """
    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    if pickler is None:
        made: Any = cloudpickle.Pickler(
            file, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append
        )
    else:
        made = pickler(file, buffers.append)
    target = _Raw(obj) if type(obj) in (bytes, bytearray) else obj  # type: ignore[arg-type]
    made.dump(target)
    return [file.getvalue(), *(buffer.raw() for buffer in buffers)]


def owned(parts: Sequence[Part]) -> list[Part]:
    """``parts`` with each writable buffer copied: what a later in-place change of the
    object cannot alter (read-only buffers, such as a ``bytes`` object's, are kept)."""
    return [bytes(p) if isinstance(p, memoryview) and not p.readonly else p for p in parts]


def digest(parts: Sequence[Part]) -> str:
    """The content key of a blob: a hash over its parts, read in place."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(len(part).to_bytes(8, "big"))
        hasher.update(part)
    return hasher.hexdigest()[:32]


def frame(key: str, parts: Sequence[Part]) -> list[Part]:
    """The ``BLOB`` frame carrying blob ``key`` as a list of buffers (see the module)."""
    lengths = [len(part) for part in parts]
    meta = pickle.dumps((key, lengths), protocol=PICKLE_PROTOCOL)
    body: list[Part] = [META.pack(len(meta)) + meta]
    total = len(body[0])
    for index, part in enumerate(parts):
        if index:  # out-of-band buffers start aligned, as numpy expects its data
            pad = -total % ALIGN
            if pad:
                body.append(bytes(pad))
                total += pad
        body.append(part)
        total += len(part)
    ratio = _sampled_ratio(parts)
    if ratio < (0.9 if total <= COMPRESS_MAX else WELL_COMPRESSED):
        packed = _compress(body, total)
        if len(packed) < total:
            return [HEADER.pack(MAGIC, PROTOCOL, Kind.BLOB, FLAG_LZ4, len(packed)) + packed]
    return [HEADER.pack(MAGIC, PROTOCOL, Kind.BLOB, 0, total) + body[0], *body[1:]]


def _compress(parts: Sequence[Part], total: int) -> bytes:
    """lz4 over the parts one after the other (never joined), declaring the total size."""
    compressor = lz4.frame.LZ4FrameCompressor(compression_level=0)
    out = [compressor.begin(source_size=total)]
    out.extend(compressor.compress(part) for part in parts)
    out.append(compressor.flush())
    return b"".join(out)


def split(body: bytes | bytearray) -> tuple[str, list[memoryview]]:
    """A ``BLOB`` body's key and parts (``[in-band, buffer, ...]``), slices of ``body``."""
    view = memoryview(body)
    try:
        (size,) = META.unpack_from(view)
        key, lengths = pickle.loads(view[META.size : META.size + size])
    except Exception as exc:
        raise ProtocolError(f"a BLOB frame's header is malformed: {exc}") from None
    offset = META.size + size
    parts = []
    for index, length in enumerate(lengths):
        if index:
            offset += -offset % ALIGN
        if length < 0 or offset + length > len(view):
            raise ProtocolError(
                f"a BLOB frame's parts ({sum(lengths)} bytes) overrun its body ({len(view)} bytes)"
            )
        parts.append(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise ProtocolError(
            f"a BLOB frame's parts end at byte {offset} of its {len(view)}-byte body"
        )
    return key, parts


def _sampled_ratio(parts: Sequence[Part], sample: int = 64 * 1024) -> float:
    """How well lz4 shrinks these parts, judged on three samples of the largest (0 to ~1).

    Float features rarely compress; skipping the attempt saves ~1.5 ms per MB.
    """
    largest = memoryview(max(parts, key=len))
    if len(largest) <= 4 * sample:
        return 0.0
    middle = len(largest) // 2
    samples = (largest[:sample], largest[middle : middle + sample], largest[-sample:])
    packed = sum(len(lz4.frame.compress(s, compression_level=0)) for s in samples)
    return packed / (len(samples) * sample)
