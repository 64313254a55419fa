"""Skyward: run ``joblib.Parallel`` (and every scikit-learn ``n_jobs``) on a cluster.

Public API: :class:`Compute`, :class:`Worker`, :class:`Image`, the providers
:class:`Local`, :class:`SSH` and :class:`AWS`, the ``plugins`` namespace and
the :data:`hookimpl` marker for writing plugins.

Each name is imported on first use (PEP 562): ``python -m skyward.agent`` imports
this package too, and a worker must not load the client (pluggy, paramiko, boto3).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from skyward.compute import Compute
    from skyward.errors import (
        BlobUnavailableError,
        ComputeStateError,
        NoWorkersError,
        PinConflictError,
        PluginError,
        RemoteError,
        UnpicklableTaskError,
        VersionMismatchError,
        WorkerDiedError,
    )
    from skyward.hookspecs import hookimpl
    from skyward.plugins import namespace as plugins
    from skyward.providers.aws import AWS
    from skyward.providers.local import Local
    from skyward.providers.ssh import SSH
    from skyward.spec import Image, Worker

__all__ = [
    "AWS",
    "SSH",
    "BlobUnavailableError",
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

# Public name -> (module, attribute in it).
_LAZY = {
    "AWS": ("skyward.providers.aws", "AWS"),
    "SSH": ("skyward.providers.ssh", "SSH"),
    "BlobUnavailableError": ("skyward.errors", "BlobUnavailableError"),
    "Compute": ("skyward.compute", "Compute"),
    "ComputeStateError": ("skyward.errors", "ComputeStateError"),
    "Image": ("skyward.spec", "Image"),
    "Local": ("skyward.providers.local", "Local"),
    "NoWorkersError": ("skyward.errors", "NoWorkersError"),
    "PinConflictError": ("skyward.errors", "PinConflictError"),
    "PluginError": ("skyward.errors", "PluginError"),
    "RemoteError": ("skyward.errors", "RemoteError"),
    "UnpicklableTaskError": ("skyward.errors", "UnpicklableTaskError"),
    "VersionMismatchError": ("skyward.errors", "VersionMismatchError"),
    "Worker": ("skyward.spec", "Worker"),
    "WorkerDiedError": ("skyward.errors", "WorkerDiedError"),
    "hookimpl": ("skyward.hookspecs", "hookimpl"),
    "plugins": ("skyward.plugins", "namespace"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'skyward' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package: ``skyward.plugins`` names the plugin namespace, not the submodule.

    Python binds a submodule on its package once it is imported, and the submodule
    ``skyward.plugins`` is imported whenever ``skyward.compute`` is: that binding is
    skipped so that ``sky.plugins.joblib()`` keeps working.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "plugins" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
