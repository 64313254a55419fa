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
from skyward.providers.forkserver import ForkServer


@dataclass(frozen=True)
class Local(Provider):
    """Run each node as a local agent process.

    Args:
        python: the interpreter for the agents (defaults to the client's). It must
            have skyward and the task's dependencies importable.
        fork: fork the agents from one template process that imported the agent once
            (fast: 100 nodes start in about a second), rather than start an interpreter
            per node. ``None`` (the default) forks when ``python`` is the client's own
            interpreter, which is then known to run skyward's template; pass ``True``
            or ``False`` to choose. Either way each node is its own process.
    """

    python: str = field(default_factory=lambda: sys.executable)
    fork: bool | None = None

    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        """One launcher per node; with ``fork``, also the template (closed by ``cleanup``)."""
        env = _agent_env()
        env[NODE_CPUS_ENV] = str(max(node_cpus() // spec.nodes, 1))  # this machine, shared
        fork = self.fork if self.fork is not None else self.python == sys.executable
        server: ForkServer | None = None
        if fork:
            server = ForkServer(self.python, env)
            cleanup.callback(server.close)
        return [_LocalLauncher(f"node-{i}", self.python, env, server) for i in range(spec.nodes)]


def _agent_env() -> dict[str, str]:
    env = dict(os.environ)
    # Same machine, same code: tasks pickled by reference (functions of the user's
    # modules) import from the client's own path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class _LocalLauncher(Launcher):
    name: str
    python: str
    env: dict[str, str]
    server: ForkServer | None = None

    def open(self) -> Channel:
        if self.server is not None:
            return self.server.spawn(self.name)
        return PipeChannel(self.name, [self.python, "-m", "skyward.agent"], self.env)
