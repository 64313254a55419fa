"""Loopback OpenSSH test hosts: real ``sshd`` daemons on 127.0.0.2, .3, .4 port 2222.

Loaded by ``conftest.py`` as a pytest plugin. The session fixture
:func:`sshd_hosts` generates a host key per host and one client key, starts
the daemons, yields an :class:`SSHDCluster` (addresses, client key, a
known_hosts file trusting exactly these hosts) and stops every daemon by pid.
No ``sshd`` on this machine: skipped locally, a failure when ``CI=true``.

:func:`start_sshd` is reusable on its own (e.g. with a host key that a test
generated itself, as the AWS provider pins).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import psutil
import pytest
from conftest import agent_processes, need, wait_until
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyward.bootstrap import wheel_from_installed

SSHD = "/usr/sbin/sshd"
PORT = 2222
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def write_keypair(path: Path) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 0600) to ``path``; return the
    public key line."""
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return public.decode()


@dataclass(frozen=True)
class SSHDHost:
    """One running test daemon."""

    address: str
    port: int
    pid: int
    host_key_file: str
    public_key: str  # "ssh-ed25519 AAAA..."

    @property
    def known_hosts_line(self) -> str:
        """This host's entry for a known_hosts file."""
        return f"[{self.address}]:{self.port} {self.public_key}\n"

    def host_key(self) -> paramiko.PKey:
        """The host's public key as paramiko sees it."""
        return paramiko.Ed25519Key(filename=self.host_key_file)

    def sessions(self) -> list[psutil.Process]:
        """sshd processes serving connections to this daemon (its children)."""
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


@dataclass(frozen=True)
class SSHDCluster:
    """The test hosts and what a client needs to log in to them."""

    hosts: tuple[SSHDHost, ...]
    user: str
    key_filename: str
    known_hosts: str
    workdir: str

    def specs(self) -> list[str]:
        """``user@address:port`` for every host."""
        return [f"{self.user}@{h.address}:{h.port}" for h in self.hosts]

    def sessions(self) -> list[psutil.Process]:
        """Every sshd session process of every host."""
        return [p for h in self.hosts for p in h.sessions()]


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_sshd(
    address: str, port: int, host_key_file: Path, authorized_keys: Path, workdir: Path
) -> subprocess.Popen[bytes]:
    """Start ``sshd -D`` on ``address:port``; fail clearly if the port is taken or it dies."""
    if _listening(address, port):
        pytest.fail(
            f"{address}:{port} is already taken (a leftover test sshd? see "
            f"`ss -ltnp | grep {port}`); stop that process and rerun"
        )
    name = f"sshd-{address}-{port}"
    config = workdir / f"{name}.conf"
    config.write_text(
        f"ListenAddress {address}:{port}\n"
        f"HostKey {host_key_file}\n"
        f"PidFile {workdir / name}.pid\n"
        f"AuthorizedKeysFile {authorized_keys}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PrintMotd no\n"
        "MaxStartups 100\n"
        "MaxSessions 50\n"
        "Subsystem sftp internal-sftp\n"
    )
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the daemon
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config), "-h", str(host_key_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    if not wait_until(lambda: proc.poll() is not None or _listening(address, port), 10, 0.05):
        stop_sshd(proc)
        pytest.fail(f"sshd on {address}:{port} did not start listening within 10 s")
    if proc.poll() is not None:
        text = (workdir / f"{name}.log").read_text(errors="replace")
        pytest.fail(f"sshd on {address}:{port} exited ({proc.returncode}):\n{text[-2000:]}")
    return proc


def stop_sshd(proc: subprocess.Popen[bytes]) -> None:
    """Stop a daemon started by :func:`start_sshd` and any session it still serves."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def sshd_hosts() -> Iterator[SSHDCluster]:
    """Three loopback sshd hosts for the whole session, stopped at its end."""
    need(os.path.exists(SSHD), "sshd (package openssh-server)")
    os.makedirs("/run/sshd", exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="skyward-sshd-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client_key = workdir / "client_key"
        authorized = workdir / "authorized_keys"
        authorized.write_text(write_keypair(client_key) + "\n")
        hosts = []
        for address in ADDRESSES:
            host_key = workdir / f"host_key_{address}"
            public = write_keypair(host_key)
            proc = start_sshd(address, PORT, host_key, authorized, workdir)
            procs.append(proc)
            hosts.append(SSHDHost(address, PORT, proc.pid, str(host_key), public))
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line for h in hosts))
        yield SSHDCluster(
            tuple(hosts), getpass.getuser(), str(client_key), str(known_hosts), str(workdir)
        )
    finally:
        for proc in procs:
            stop_sshd(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def ssh_env_root() -> Iterator[str]:
    """One folder for the hosts' environments for the whole session (warm after the first)."""
    root = tempfile.mkdtemp(prefix="skyward-envs-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


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

# Packages of the test wheelhouse: what the agent imports, plus joblib (the joblib plugin's
# pin) and threadpoolctl (a marker a task can import to prove the offline install).
WHEELHOUSE_PACKAGES = ("cloudpickle", "lz4", "pluggy", "joblib", "threadpoolctl")


@pytest.fixture(scope="session")
def ssh_wheelhouse() -> Iterator[str]:
    """A wheelhouse repacked from this interpreter's installed distributions (no network)."""
    folder = Path(tempfile.mkdtemp(prefix="skyward-wheelhouse-"))
    try:
        for name in WHEELHOUSE_PACKAGES:
            wheel_from_installed(name, folder)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
