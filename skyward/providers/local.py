"""``sky.Local()``: every node is an agent subprocess on this machine, over pipes.

The nodes share this machine's CPUs: each agent is told its share
(``SKYWARD_NODE_CPUS``), so tasks default to as many BLAS/OpenMP threads as loky
would give them on the same cores.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field

from skyward.agent.cpus import NODE_CPUS_ENV, node_cpus
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
        share = max(node_cpus() // spec.nodes, 1)
        return [_LocalLauncher(f"node-{i}", self.python, share) for i in range(spec.nodes)]


@dataclass
class _LocalLauncher(Launcher):
    name: str
    python: str
    cpus: int

    def open(self) -> Channel:
        env = dict(os.environ)
        # Same machine, same code: tasks pickled by reference (functions of the user's
        # modules) import from the client's own path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["PYTHONUNBUFFERED"] = "1"
        env[NODE_CPUS_ENV] = str(self.cpus)
        return PipeChannel(self.name, [self.python, "-m", "skyward.agent"], env)
