"""Ctrl-C while nodes are still starting returns at once and stops what was started
(issue 12, row 10).

Each test runs a client in a subprocess whose cluster has one node up and one still
starting, sends it SIGINT, and checks that it exits well before the slow start could
have finished (the start is held for far longer than the bound) and leaves no agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from sshd_hosts import SSHDCluster
from test_ssh_faults import FreezableProxy

pytestmark = pytest.mark.timeout(240)

# The slow node's start is held for 90 s and connect_timeout is 80 s: a client that
# waited for it would still be running when this bound expires.
EXIT_BOUND = 20.0
HELD_START = 90

# Runs in place of `python -m skyward.agent`: the first agent starts at once, the
# others wait for a `release` file (bounded) before becoming agents.
SLOW_AGENT = textwrap.dedent(
    f"""
    import os, runpy, time
    from pathlib import Path

    folder = Path(os.environ["SKYWARD_TEST_SLOW_DIR"])
    (folder / f"agent-{{os.getpid()}}").touch()
    try:
        os.close(os.open(folder / "first", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        deadline = time.monotonic() + {HELD_START}
        while not (folder / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    runpy.run_module("skyward.agent", run_name="__main__")
    """
)

LOCAL_CLIENT = textwrap.dedent(
    """
    import logging, sys
    import skyward as sky

    logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
    with sky.Compute(provider=sky.Local(python=sys.argv[1]), nodes=2, connect_timeout=80):
        print("entered", flush=True)
    """
)

SSH_CLIENT = textwrap.dedent(
    """
    import json, logging, sys
    import skyward as sky

    cfg = json.loads(sys.argv[1])
    logging.basicConfig(filename=cfg["log"], level=logging.INFO)
    provider = sky.SSH(cfg["hosts"], key_filename=cfg["key"], known_hosts=cfg["known_hosts"],
                       python=sys.executable, env_root=cfg["env_root"], connect_timeout=80)
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=cfg["wheelhouse"])
    with sky.Compute(provider, nodes=2, image=image, connect_timeout=80):
        print("entered", flush=True)
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def interrupt(client: subprocess.Popen[str], ready: Callable[[], bool]) -> str:
    """Once ``ready()``, send Ctrl-C; return the client's stderr after it exited."""
    assert wait_until(ready, 120), "the client never got one node up and one starting"
    client.send_signal(signal.SIGINT)
    try:
        out, err = client.communicate(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client was still running {EXIT_BOUND:.0f}s after Ctrl-C")
    assert "entered" not in out
    assert "KeyboardInterrupt" in err, err
    return err


def test_ctrl_c_while_a_local_node_is_starting(tmp_path: Path, no_agents_left: None) -> None:
    slow = tmp_path / "slow"
    slow.mkdir()
    agent = tmp_path / "slow_agent.py"
    agent.write_text(SLOW_AGENT)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {agent} "$@"\n')
    python.chmod(0o755)
    log = tmp_path / "client.log"
    log.touch()
    client = subprocess.Popen(
        [sys.executable, "-c", LOCAL_CLIENT, str(python), str(log)],
        env=dict(os.environ, SKYWARD_TEST_SLOW_DIR=str(slow)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def agents() -> list[int]:
        return [int(p.name.split("-")[1]) for p in slow.glob("agent-*")]

    try:
        interrupt(client, lambda: len(agents()) == 2 and "ready in" in log.read_text())
        pids = agents()
        assert wait_until(lambda: not any(alive(pid) for pid in pids), 5.0), (
            f"agents left running: {[pid for pid in pids if alive(pid)]}"
        )
    finally:
        (slow / "release").touch()
        if client.poll() is None:
            client.kill()
            client.communicate()


def test_ctrl_c_while_an_ssh_node_is_connecting(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str, tmp_path: Path
) -> None:
    host = ssh_clean.hosts[0]
    proxy = FreezableProxy((host.address, host.port))
    proxy.frozen.set()  # the connection through it hangs before the SSH banner
    log = tmp_path / "client.log"
    log.touch()
    known = tmp_path / "known_hosts"
    known.write_text(
        Path(ssh_clean.known_hosts).read_text() + f"[127.0.0.1]:{proxy.port} {host.public_key}\n"
    )
    up = ssh_clean.specs()[1]
    cfg = {
        "hosts": [up, f"{ssh_clean.user}@127.0.0.1:{proxy.port}"],
        "key": ssh_clean.key_filename,
        "known_hosts": str(known),
        "env_root": ssh_env_root,
        "wheelhouse": ssh_wheelhouse,
        "log": str(log),
    }
    client = subprocess.Popen(
        [sys.executable, "-c", SSH_CLIENT, json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    up_name = up.split("@")[-1]
    try:
        interrupt(
            client,
            lambda: len(proxy.sockets) > 1 and f"node {up_name} ready in" in log.read_text(),
        )
        # ssh_clean then checks that no agent and no sshd session is left.
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        proxy.close()
