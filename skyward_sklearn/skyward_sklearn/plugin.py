"""The scikit-learn plugin: the joblib plugin plus a worker image that can run the client's models.

A fitted estimator only unpickles safely under the scikit-learn release that
produced it, and scikit-learn's tasks travel between client and workers in both
directions (estimators to fit, fitted estimators and scores back). So the image
pins ``scikit-learn`` to the client's release and ``joblib`` to the client's
(joblib's batch objects are pickled by reference), and keeps ``numpy`` and
``scipy`` on the client's major version (arrays and sparse matrices pickled by
one major version need not load under another).

scikit-learn's callbacks (``ProgressBar``, ``ScoringMonitor``) send their
messages from the workers to the client over the cluster's own channel (see
:mod:`skyward_sklearn.relay`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any

from skyward_joblib.plugin import JoblibPlugin, check_version

import skyward as sky
from skyward.spec import Image, requirement_name
from skyward_sklearn import relay

if TYPE_CHECKING:
    from skyward.compute import Compute

__all__ = ["SklearnPlugin", "installed_version"]

_SPECIFIER_CHARS = frozenset("=<>!~")


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` installed on the client, or ``None``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _same_major(distribution: str) -> str | None:
    version = installed_version(distribution)
    if version is None:
        return None
    major = int(version.split(".")[0])
    return f"{distribution}>={major},<{major + 1}"


def _pinned(image: Image) -> set[str]:
    """Names of the packages the image already constrains with a version specifier."""
    return {requirement_name(r) for r in image.pip if _SPECIFIER_CHARS.intersection(r)}


class SklearnPlugin:
    """``sky.plugins.sklearn(version=None)``: scikit-learn's ``n_jobs`` runs on the cluster.

    Every ``joblib.Parallel`` inside scikit-learn (``GridSearchCV``,
    ``cross_validate``, forests, ``permutation_importance``...) dispatches to the
    cluster while the ``Compute`` runs, exactly as with ``sky.plugins.joblib()``,
    whose client side this plugin reuses. Both plugins may be passed together.

    Args:
        version: scikit-learn release for the workers; ``None`` (the default) pins
            the client's own release, the only one guaranteed to unpickle its models.
    """

    name = "sklearn"

    def __init__(self, version: str | None = None) -> None:
        chosen = check_version(version, "scikit-learn", "sklearn", "the client's release")
        if chosen is None:
            chosen = installed_version("scikit-learn")
        if chosen is None:  # pragma: no cover - scikit-learn is a dependency of this package
            raise RuntimeError(
                "scikit-learn is not installed on the client: pip install 'skyward[sklearn]'"
            )
        self.version: str = chosen
        self.joblib = JoblibPlugin(version=installed_version("joblib"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r})"

    @property
    def requirements(self) -> tuple[str, ...]:
        """Every pip requirement this plugin may add to the worker image."""
        extra = (_same_major("numpy"), _same_major("scipy"))
        return (
            f"scikit-learn=={self.version}",
            self.joblib.requirement,
            *(r for r in extra if r is not None),
        )

    @sky.hookimpl
    def transform_image(self, image: Image) -> Image:
        """Add scikit-learn (pinned), and joblib, numpy, scipy unless the image pins them."""
        pinned = _pinned(image)
        scikit_learn, *others = self.requirements
        return image.with_pip(
            scikit_learn, *(r for r in others if requirement_name(r) not in pinned)
        )

    @sky.hookimpl
    def worker_initializers(self) -> tuple[str, ...]:
        """On each worker, scikit-learn's callback messages go to the client through Skyward."""
        return (f"{relay.__name__}:{relay.install.__name__}",)

    @sky.hookimpl
    def around_client(self, compute: Compute) -> AbstractContextManager[Any]:
        """Route ``joblib.Parallel`` (so scikit-learn's ``n_jobs``) and callback messages."""
        return self._around_client(compute)

    @contextmanager
    def _around_client(self, compute: Compute) -> Iterator[None]:
        compute.on_message(relay.TOPIC, relay.answer)
        try:
            with self.joblib.around_client(compute):
                yield
        finally:
            compute.on_message(relay.TOPIC, None)
