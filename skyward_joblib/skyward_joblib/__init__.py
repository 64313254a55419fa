"""Skyward's joblib plugin: every ``joblib.Parallel`` runs on the cluster.

``sky.plugins.joblib(version=None)`` returns a :class:`JoblibPlugin`. Importing this
package registers the ``"skyward"`` joblib backend name (:class:`SkywardBackend`),
so ``joblib.parallel_config(backend="skyward")`` works inside any running
``sky.Compute``, and inside the workers it names their local backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from joblib import register_parallel_backend as _register

from skyward_joblib.activation import BACKEND_NAME
from skyward_joblib.backend import NoComputeError, SkywardBackend

if TYPE_CHECKING:
    from skyward_joblib.plugin import JoblibPlugin

__all__ = ["JoblibPlugin", "NoComputeError", "SkywardBackend", "joblib"]

_register(BACKEND_NAME, SkywardBackend)


def joblib(version: str | None = None) -> JoblibPlugin:
    """The plugin object for ``plugins=[...]``: ``sky.plugins.joblib(version="1.4.2")``."""
    from skyward_joblib.plugin import JoblibPlugin

    return JoblibPlugin(version=version)


def __getattr__(name: str) -> Any:
    # The plugin (client side: it loads skyward.spec) is imported on first use, so that a
    # worker unpickling a batch imports only the backend and the batch wrapper.
    if name == "JoblibPlugin":
        from skyward_joblib.plugin import JoblibPlugin

        return JoblibPlugin
    raise AttributeError(f"module 'skyward_joblib' has no attribute {name!r}")
