"""The joblib plugin: joblib on the worker image, ``joblib.Parallel`` routed to the cluster."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

from joblib import parallel_config, register_parallel_backend

import skyward as sky
from skyward.spec import Image
from skyward_joblib import activation
from skyward_joblib.backend import SkywardBackend

if TYPE_CHECKING:
    from skyward.compute import Compute

__all__ = ["JoblibPlugin", "use_cluster"]

_VERSION = re.compile(r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?")


def check_version(
    version: str | None, package: str, plugin: str, default: str = "the latest"
) -> str | None:
    """Validate a plugin's ``version=`` argument: ``None`` or a plain release like ``1.4.2``.

    ``default`` says what ``None`` installs, for the error message.
    """
    if version is None:
        return None
    if not isinstance(version, str) or not _VERSION.fullmatch(version.strip()):
        raise ValueError(
            f"sky.plugins.{plugin}(version={version!r}) is not a {package} release: give a "
            f"version such as '1.4.2' (installed as {package}==1.4.2), or None for {default}"
        )
    return version.strip()


@contextmanager
def use_cluster(compute: Compute) -> Iterator[None]:
    """While the ``with`` block runs, every ``joblib.Parallel`` dispatches to ``compute``.

    Registers the ``"skyward"`` backend, keeps only worker-safe warning filters, enters
    ``parallel_config(backend="skyward")`` in this thread and makes it the process-wide
    default for the others; restores all of it on exit. Entering it again for a
    ``Compute`` that already has it (two joblib-based plugins) changes nothing.
    """
    if activation.is_active(compute):
        yield
        return
    register_parallel_backend(activation.BACKEND_NAME, SkywardBackend)
    with (
        activation.process_default(compute),
        parallel_config(backend=SkywardBackend(compute=compute)),
    ):
        yield


class JoblibPlugin:
    """``sky.plugins.joblib(version=None)``: ``joblib.Parallel`` runs on the cluster.

    Args:
        version: joblib release to install on the workers (``joblib==<version>``);
            ``None`` installs the latest. Keep it equal to the client's joblib.
    """

    name = "joblib"

    def __init__(self, version: str | None = None) -> None:
        self.version = check_version(version, "joblib", "joblib")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version!r})"

    @property
    def requirement(self) -> str:
        """The pip requirement this plugin adds to the worker image."""
        return "joblib" if self.version is None else f"joblib=={self.version}"

    @sky.hookimpl
    def transform_image(self, image: Image) -> Image:
        """Add joblib (pinned when ``version`` is given) and threadpoolctl to the workers.

        threadpoolctl lets long-lived workers apply each call's BLAS/OpenMP thread
        limits to libraries they have already loaded (see :mod:`skyward_joblib.threads`).
        """
        return image.with_pip(self.requirement, "threadpoolctl")

    @sky.hookimpl
    def around_client(self, compute: Compute) -> AbstractContextManager[Any]:
        """Route ``joblib.Parallel`` to ``compute`` while it runs (see :func:`use_cluster`)."""
        return use_cluster(compute)
