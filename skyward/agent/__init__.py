"""The worker agent: ``python -m skyward.agent``.

- :mod:`~skyward.agent.serve`: the serve loop (handshake, the client's frames,
  thread slots) and :func:`emit`, with which a task messages the client.
- :mod:`~skyward.agent.slots`: ``executor="process"``: each slot a child agent
  (``python -m skyward.agent --child``) driven over pipes with the same frames.
- :mod:`~skyward.agent.cache`: the blobs this agent holds.

The agent carries nothing of the client: it imports only :mod:`skyward.wire`,
:mod:`skyward.errors`, cloudpickle, lz4 and the standard library (a test walks
the imports), so a worker needs none of the client's dependencies.
"""

from __future__ import annotations

from skyward.agent.cache import DEFAULT_CACHE_BYTES, BlobCache
from skyward.agent.serve import Agent, emit, main
from skyward.agent.slots import ProcessSlots, Slot

__all__ = ["DEFAULT_CACHE_BYTES", "Agent", "BlobCache", "ProcessSlots", "Slot", "emit", "main"]
