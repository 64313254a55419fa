"""Skyward: run ``joblib.Parallel`` (and every scikit-learn ``n_jobs``) on a cluster.

Public API: :class:`Compute`, :class:`Worker`, :class:`Image`, the providers
:class:`Local`, :class:`SSH` and :class:`AWS`, the ``plugins`` namespace and
the :data:`hookimpl` marker for writing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from skyward.compute import Compute, ComputeStateError
from skyward.hookspecs import hookimpl
from skyward.plugins import PluginError
from skyward.plugins import namespace as plugins
from skyward.providers.local import Local
from skyward.scheduler import NoWorkersError, WorkerDiedError
from skyward.spec import Image, PinConflictError, Worker
from skyward.wire import RemoteError, UnpicklableTaskError, VersionMismatchError

__version__ = "0.1.0"

if TYPE_CHECKING:
    from skyward.providers.aws import AWS
    from skyward.providers.ssh import SSH

__all__ = [
    "AWS",
    "SSH",
    "Compute",
    "ComputeStateError",
    "Image",
    "Local",
    "NoWorkersError",
    "PinConflictError",
    "PluginError",
    "RemoteError",
    "UnpicklableTaskError",
    "VersionMismatchError",
    "Worker",
    "WorkerDiedError",
    "hookimpl",
    "plugins",
]


def __getattr__(name: str) -> Any:
    # SSH and AWS load paramiko / boto3 only when used.
    if name == "SSH":
        from skyward.providers.ssh import SSH

        return SSH
    if name == "AWS":
        from skyward.providers.aws import AWS

        return AWS
    raise AttributeError(f"module 'skyward' has no attribute {name!r}")
