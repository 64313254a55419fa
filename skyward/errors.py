"""Skyward's exceptions.

For now the errors of starting and removing nodes, which every provider raises
(the other exceptions still live beside the code that raises them).
"""

from __future__ import annotations

__all__ = ["AWSCleanupError", "BootstrapError", "HostKeyError", "NodeStartError"]


class NodeStartError(RuntimeError):
    """A node could not be started; the message names the node and the step."""


class HostKeyError(NodeStartError):
    """The host's SSH key is unknown or differs from the trusted one."""


class BootstrapError(RuntimeError):
    """A host's environment could not be prepared; ``step`` names what failed."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


class AWSCleanupError(RuntimeError):
    """Some AWS resources of a cluster could not be removed (the message says which)."""


# --- wire


class ProtocolError(RuntimeError):
    """The byte stream does not carry well-formed Skyward frames (wrong peer, output on the
    agent's stdout, a truncated frame, or a frame above the size limit)."""


class RemoteError(Exception):
    """A task failed with an exception that could not be recreated on the client."""


class VersionMismatchError(RuntimeError):
    """Client and agent run versions that cannot exchange pickled tasks."""


class UnpicklableTaskError(TypeError):
    """A task (function or argument) cannot be serialized for the cluster."""


class MissingBlobError(LookupError):
    """A task references a blob the agent does not hold."""


__all__ += [
    "MissingBlobError",
    "ProtocolError",
    "RemoteError",
    "UnpicklableTaskError",
    "VersionMismatchError",
]
