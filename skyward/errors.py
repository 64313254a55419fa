"""Every public exception of Skyward, in one leaf module.

It imports nothing from skyward, so the agent, the wire layer and the client
all raise from here; ``skyward.<Name>`` re-exports the ones users catch.
"""

from __future__ import annotations

__all__ = [
    "AWSCleanupError",
    "BlobUnavailableError",
    "BootstrapError",
    "ComputeStateError",
    "CostLimitError",
    "HostKeyError",
    "MissingBlobError",
    "NoWorkersError",
    "NodeStartError",
    "PinConflictError",
    "PluginError",
    "ProtocolError",
    "RemoteError",
    "UnpicklableTaskError",
    "VersionMismatchError",
    "WorkerDiedError",
]


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


class CostLimitError(ValueError):
    """A cluster's estimated hourly cost is above ``sky.AWS(max_hourly_cost=...)``."""


class ComputeStateError(RuntimeError):
    """A ``Compute`` was used outside its ``with`` block, or entered twice."""


class NoWorkersError(RuntimeError):
    """Every node of the cluster is gone, so the remaining tasks cannot run."""


class WorkerDiedError(RuntimeError):
    """A task killed the worker that ran it on every attempt."""


class PinConflictError(ValueError):
    """Two plugins (or a plugin and the image) require one package at different versions."""


class PluginError(TypeError):
    """An object passed in ``plugins=[...]`` is not a usable plugin."""


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


class BlobUnavailableError(RuntimeError):
    """A task's large argument is needed again but the client can no longer produce it
    (its bytes were dropped to stay within ``SKYWARD_CLIENT_BLOB_BYTES`` and the object
    was freed or changed)."""
