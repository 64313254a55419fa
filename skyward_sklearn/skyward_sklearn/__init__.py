"""Skyward's scikit-learn plugin: scikit-learn's ``n_jobs`` runs on a Skyward cluster.

``sky.plugins.sklearn(version=None)`` returns a :class:`SklearnPlugin`. It
routes every ``joblib.Parallel`` scikit-learn starts to the running
``sky.Compute`` (through the joblib plugin's ``SkywardBackend``) and gives the
workers the client's scikit-learn release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from skyward_sklearn.plugin import SklearnPlugin, installed_version

__all__ = ["SklearnPlugin", "installed_version", "sklearn"]


def sklearn(version: str | None = None) -> SklearnPlugin:
    """The plugin object for ``plugins=[...]``: ``sky.plugins.sklearn()``."""
    from skyward_sklearn.plugin import SklearnPlugin

    return SklearnPlugin(version=version)


def __getattr__(name: str) -> Any:
    # Workers import skyward_sklearn.relay: the plugin (and the Skyward client) load lazily.
    if name in ("SklearnPlugin", "installed_version"):
        from skyward_sklearn import plugin

        return getattr(plugin, name)
    raise AttributeError(f"module 'skyward_sklearn' has no attribute {name!r}")
