"""The hooks a Skyward plugin may implement. This module is the one place that lists them."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from skyward.compute import Compute
    from skyward.spec import Image

hookspec = pluggy.HookspecMarker("skyward")
hookimpl = pluggy.HookimplMarker("skyward")


@hookspec(firstresult=True)
def transform_image(image: Image) -> Image:
    """Return the worker image with this plugin's packages, pins and environment added."""
    raise NotImplementedError


@hookspec(firstresult=True)
def around_client(compute: Compute) -> AbstractContextManager[Any]:
    """Return a context manager entered once the cluster is up and left before it stops."""
    raise NotImplementedError


@hookspec(firstresult=True)
def worker_initializers() -> Sequence[str]:
    """Return ``"module:function"`` names each agent calls once at start, before any task.

    They run on every worker (importing only what they need: agents start often);
    e.g. the sklearn plugin routes scikit-learn's callback messages to the client.
    """
    raise NotImplementedError
