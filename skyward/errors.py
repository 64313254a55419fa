"""Skyward's exceptions.

For now the errors of starting and removing nodes, which every provider raises
(the other exceptions still live beside the code that raises them).
"""

from __future__ import annotations

__all__ = ["AWSCleanupError", "BootstrapError", "CostLimitError", "HostKeyError", "NodeStartError"]


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


# --- client

__all__ += [
    "ComputeStateError",
    "NoWorkersError",
    "PinConflictError",
    "PluginError",
    "WorkerDiedError",
]


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
