"""Local agents forked from one pre-imported template (issue 15, fast start of many nodes).

Each agent is its own process, a child of the template and not of the client, with
nothing of the client but its own three pipes; it is killed on every exit path and
exits when the client dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

import skyward as sky

pytestmark = pytest.mark.timeout(120)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_agents_are_forked_from_a_template_with_only_their_pipes(tmp_path: Path) -> None:
    marker = tmp_path / "client-file"
    with marker.open("w") as held:  # a descriptor the client holds: no agent may have it
        os.set_inheritable(held.fileno(), True)
        with sky.Compute(provider=sky.Local(), nodes=3) as compute:
            pids = [node.channel.pid for node in compute.nodes]
            assert all(pid is not None for pid in pids)
            agents = [psutil.Process(pid) for pid in pids if pid is not None]
            templates = {agent.ppid() for agent in agents}
            assert len(templates) == 1 and os.getpid() not in templates, (
                "each agent should be a child of one template process, not of the client"
            )
            (template,) = templates
            assert psutil.Process(template).ppid() == os.getpid()
            for agent in agents:
                assert os.getsid(agent.pid) == agent.pid  # own session: Ctrl-C spares it
                fds = sorted(int(fd) for fd in os.listdir(f"/proc/{agent.pid}/fd"))
                own = {fd for fd in fds if fd > 2}
                # Above 0-2 the agent has only what it opened itself: no path of the client.
                paths = {os.readlink(f"/proc/{agent.pid}/fd/{fd}") for fd in own}
                assert str(marker) not in paths
            assert compute.submit(os.getpid).result() in pids
    for pid in [*pids, template]:
        assert wait_until(lambda pid=pid: gone(pid), 5.0), f"process {pid} left running"


def test_a_killed_forked_agent_is_replaced_and_reaped() -> None:
    with sky.Compute(provider=sky.Local(), nodes=2, restarts=1) as compute:
        victim = compute.nodes[0].channel.pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: gone(victim), 10.0)
        assert sum(compute.submit(abs, -i).result() for i in range(20)) == 190


CLIENT = textwrap.dedent(
    """
    import os, sys, time
    import skyward as sky

    with sky.Compute(provider=sky.Local(), nodes=3) as compute:
        pids = [n.channel.pid for n in compute.nodes]
        print(" ".join(map(str, pids)), flush=True)
        sys.stdin.read()  # until the test kills this client
    """
)


def test_agents_and_template_exit_when_the_client_is_killed() -> None:
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        pids = [int(p) for p in client.stdout.readline().split()]
        assert pids, "the client did not start its cluster"
        template = psutil.Process(pids[0]).ppid()
        assert template != client.pid
        client.kill()
        client.wait(10)
        for pid in [*pids, template]:
            assert wait_until(lambda pid=pid: gone(pid), 10.0), f"process {pid} outlived its client"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)


def test_fork_false_starts_an_interpreter_per_node() -> None:
    with sky.Compute(provider=sky.Local(fork=False), nodes=2) as compute:
        pids = [node.channel.pid for node in compute.nodes]
        assert {psutil.Process(pid).ppid() for pid in pids if pid is not None} == {os.getpid()}


def test_a_template_that_cannot_start_is_a_clear_error() -> None:
    from skyward.providers.forkserver import ForkServer

    server = ForkServer("/bin/false", dict(os.environ))
    try:
        with pytest.raises(RuntimeError, match=r"template process .*fork=False"):
            server.spawn("node-0")
    finally:
        server.close()


def test_closing_the_template_kills_an_agent_left_running() -> None:
    from skyward.providers.forkserver import ForkServer
    from skyward.providers.local import _agent_env

    server = ForkServer(sys.executable, _agent_env())
    try:
        channel = server.spawn("node-0")
        pid = channel.pid
        assert pid is not None and not gone(pid)
    finally:
        server.close()  # the channel was never closed: the template's close kills it
    assert wait_until(lambda: gone(pid), 5.0), f"agent {pid} outlived its template"
    assert server.process.poll() is not None
