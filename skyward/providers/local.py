"""``sky.Local()``: every node is an agent subprocess on this machine, over pipes."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field

from skyward.channel import Channel, PipeChannel
from skyward.providers import ClusterSpec, Launcher, Provider


@dataclass(frozen=True)
class Local(Provider):
    """Run each node as a local agent process.

    Args:
        python: the interpreter for the agents (defaults to the client's). It must
            have skyward and the task's dependencies importable.
    """

    python: str = field(default_factory=lambda: sys.executable)

    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        """One launcher per node; nothing to clean up beyond the agents themselves."""
        return [_LocalLauncher(f"node-{i}", self.python) for i in range(spec.nodes)]


@dataclass
class _LocalLauncher(Launcher):
    name: str
    python: str

    def open(self) -> Channel:
        env = dict(os.environ)
        # Same machine, same code: tasks pickled by reference (functions of the user's
        # modules) import from the client's own path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["PYTHONUNBUFFERED"] = "1"
        return PipeChannel(self.name, [self.python, "-m", "skyward.agent"], env)
