"""The protocol spoken between the client and an agent over any byte stream.

- :mod:`~skyward.wire.frames`: the frame header, reading (bounded) and writing
  frames, their kinds, and :class:`Dispatch`, the table every frame reader uses.
- :mod:`~skyward.wire.hello`: the versions exchanged in ``HELLO`` and their check.
- :mod:`~skyward.wire.blobs`: large arguments and by-value functions as blobs, the
  client's registry of them, which holds their bytes only while tasks need them.
- :mod:`~skyward.wire.scope`: the :class:`CallScope` that bounds when identity may
  stand for content.
- :mod:`~skyward.wire.oob`: a blob's bytes, its large buffers out of band, and the
  ``BLOB`` frame layout.
- :mod:`~skyward.wire.payload`: tasks, results and errors pickled and unpickled.

The agent imports this package, so it depends only on the standard library,
cloudpickle, lz4 and :mod:`skyward.errors`. Its names are re-exported here.
"""

from __future__ import annotations

from skyward.errors import (
    BlobUnavailableError,
    MissingBlobError,
    ProtocolError,
    RemoteError,
    UnpicklableTaskError,
    VersionMismatchError,
)
from skyward.wire.blobs import (
    BLOB_MEMORY_ENV,
    BLOB_THRESHOLD,
    REUSE_THRESHOLD,
    Blob,
    BlobKeys,
    BlobRegistry,
    CallScope,
    FunctionBlob,
    blob_memory_limit,
)
from skyward.wire.frames import (
    COMPRESS_THRESHOLD,
    FLAG_LZ4,
    HEADER,
    MAGIC,
    MAX_FRAME_ENV,
    PICKLE_PROTOCOL,
    PROTOCOL,
    STOP,
    Dispatch,
    Frame,
    FrameParser,
    Kind,
    Outbox,
    Status,
    encode,
    encode_obj,
    max_frame_bytes,
    read_frame,
)
from skyward.wire.hello import check_compatible, versions
from skyward.wire.oob import Part
from skyward.wire.payload import (
    ChunkRunner,
    LazyBlob,
    UnloadableBlob,
    dumps_error,
    dumps_result,
    dumps_task,
    loads_blob,
    loads_error,
    loads_task,
)

__all__ = [
    "BLOB_MEMORY_ENV",
    "BLOB_THRESHOLD",
    "COMPRESS_THRESHOLD",
    "FLAG_LZ4",
    "HEADER",
    "MAGIC",
    "MAX_FRAME_ENV",
    "PICKLE_PROTOCOL",
    "PROTOCOL",
    "REUSE_THRESHOLD",
    "STOP",
    "Blob",
    "BlobKeys",
    "BlobRegistry",
    "BlobUnavailableError",
    "CallScope",
    "ChunkRunner",
    "Dispatch",
    "Frame",
    "FrameParser",
    "FunctionBlob",
    "Kind",
    "LazyBlob",
    "MissingBlobError",
    "Outbox",
    "Part",
    "ProtocolError",
    "RemoteError",
    "Status",
    "UnloadableBlob",
    "UnpicklableTaskError",
    "VersionMismatchError",
    "blob_memory_limit",
    "check_compatible",
    "dumps_error",
    "dumps_result",
    "dumps_task",
    "encode",
    "encode_obj",
    "loads_blob",
    "loads_error",
    "loads_task",
    "max_frame_bytes",
    "read_frame",
    "versions",
]
