"""Skyward's joblib plugin: every ``joblib.Parallel`` runs on the cluster.

``sky.plugins.joblib(version=None)`` returns a :class:`JoblibPlugin`. Importing this
package registers the ``"skyward"`` joblib backend name (:class:`SkywardBackend`),
so ``joblib.parallel_config(backend="skyward")`` works inside any running
``sky.Compute``, and inside the workers it names their local backend.
"""

from __future__ import annotations

from joblib import register_parallel_backend as _register

from skyward_joblib.activation import BACKEND_NAME
from skyward_joblib.backend import NoComputeError, SkywardBackend
from skyward_joblib.plugin import JoblibPlugin

__all__ = ["JoblibPlugin", "NoComputeError", "SkywardBackend", "joblib"]

_register(BACKEND_NAME, SkywardBackend)


def joblib(version: str | None = None) -> JoblibPlugin:
    """The plugin object for ``plugins=[...]``: ``sky.plugins.joblib(version="1.4.2")``."""
    return JoblibPlugin(version=version)
