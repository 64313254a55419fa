"""Loopback OpenSSH test hosts as pytest fixtures (a plugin loaded by ``conftest.py``).

The session fixture :func:`sshd_hosts` starts real ``sshd`` daemons on
127.0.0.2, .3, .4 port 2222 (see ``sshd_daemons.py``) and yields an
:class:`SSHDCluster`; :func:`ssh_env_root` and :func:`ssh_wheelhouse` are the
session's host environments folder and offline wheelhouse; :func:`ssh_clean`
checks that a test left no agent and no sshd session behind. No ``sshd`` on
this machine: skipped locally, a failure when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import agent_processes, need, wait_until
from sshd_daemons import (
    ADDRESSES,
    PORT,
    SSHD,
    SSHDCluster,
    SSHDError,
    SSHDHost,
    repacked_wheelhouse,
    sshd_cluster,
    start_sshd,
    stop_sshd,
    write_keypair,
)

__all__ = [
    "ADDRESSES",
    "PORT",
    "SSHD",
    "SSHDCluster",
    "SSHDHost",
    "bootstrapped_agents",
    "start_sshd",
    "stop_sshd",
    "write_keypair",
]


@pytest.fixture(scope="session")
def sshd_hosts() -> Iterator[SSHDCluster]:
    """Three loopback sshd hosts for the whole session, stopped at its end."""
    need(os.path.exists(SSHD), "sshd (package openssh-server)")
    try:
        with sshd_cluster() as cluster:
            yield cluster
    except SSHDError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def ssh_env_root() -> Iterator[str]:
    """One folder for the hosts' environments for the whole session (warm after the first)."""
    root = tempfile.mkdtemp(prefix="skyward-envs-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_wheelhouse() -> Iterator[str]:
    """A wheelhouse repacked from this interpreter's installed distributions (no network)."""
    with repacked_wheelhouse() as folder:
        yield folder


def bootstrapped_agents() -> list[psutil.Process]:
    """Agent processes running from an environment made by skyward's bootstrap.

    Other engineers' local agents on this machine are not counted; agents orphaned
    by their sshd session are.
    """
    found = []
    for proc in agent_processes():
        try:
            python = Path(proc.cmdline()[0])
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
        if (python.parent.parent / ".skyward-image").exists():
            found.append(proc)
    return found


@pytest.fixture
def ssh_clean(sshd_hosts: SSHDCluster) -> Iterator[SSHDCluster]:
    """Yield the hosts; afterwards assert no bootstrapped agent and no sshd session is left."""
    before = {p.pid for p in bootstrapped_agents()}
    yield sshd_hosts
    assert wait_until(lambda: not ({p.pid for p in bootstrapped_agents()} - before), 5.0), (
        f"agent processes left running: {[p.pid for p in bootstrapped_agents()]}"
    )
    assert wait_until(lambda: not sshd_hosts.sessions(), 5.0), (
        f"sshd sessions left open: {[p.cmdline() for p in sshd_hosts.sessions()]}"
    )
