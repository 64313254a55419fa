"""Providers produce started agents; they know nothing of tasks.

A provider turns a :class:`ClusterSpec` into one :class:`Launcher` per node,
registering any cleanup (terminate instances, close connections) on the given
``ExitStack``. ``Compute`` then opens every launcher's channel concurrently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from skyward.channel import Channel
from skyward.spec import Image, Worker


@dataclass(frozen=True)
class ClusterSpec:
    """What ``Compute`` asks a provider for."""

    nodes: int
    worker: Worker
    image: Image
    cluster_id: str
    vcpus: int | None = None
    memory: float | None = None


class Launcher(ABC):
    """Starts the agent of one node."""

    name: str

    @abstractmethod
    def open(self) -> Channel:
        """Prepare the node if needed (bootstrap), start its agent, return the channel."""

    def abort(self) -> None:  # noqa: B027 - optional hook
        """Make an :meth:`open` running in another thread fail soon (Ctrl-C, shutdown).

        ``Compute`` kills a channel that ``open`` returns after an abort, so launchers
        whose ``open`` returns quickly need nothing here.
        """

    def replacement(self) -> Launcher:
        """The launcher of this node's replacement, once the node was lost (or reclaimed).

        The default opens this launcher again (a new agent on the same machine). A
        provider whose machines can be replaced returns a launcher for a new one, whose
        :meth:`open` gives up this one's machine and starts the new one (``sky.AWS``: a
        new instance). Must return quickly: the slow work belongs in ``open``, where
        :meth:`abort` can end it.
        """
        return self


class Provider(ABC):
    """Where nodes come from."""

    def check(self, spec: ClusterSpec) -> None:  # noqa: B027 - optional hook
        """Raise a clear error early if ``spec`` cannot be satisfied (e.g. too few hosts)."""

    @abstractmethod
    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        """Return one launcher per node; register teardown of what was created on ``cleanup``."""

    def agent_config(self) -> dict[str, Any]:
        """Settings added to every agent's HELLO config (e.g. ``spot_endpoint``)."""
        return {}

    def summary(self, cluster_id: str) -> str | None:
        """A phrase for the cluster's exit summary (e.g. instance-hours and cost), or None."""
        return None
