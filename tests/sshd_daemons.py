"""Real OpenSSH daemons on loopback addresses, for the tests and the SSH benchmark.

No pytest here (the benchmarks import it too); the fixtures are in ``sshd_hosts.py``.
:func:`sshd_cluster` starts one daemon per address with a fresh host key each,
one client key and a known_hosts file trusting exactly these hosts, and stops
every daemon by pid on exit.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from skyward.bootstrap.wheels import wheel_from_installed

SSHD = "/usr/sbin/sshd"
# Several checkouts on one machine can test at once, each on its own port.
PORT = int(os.environ.get("SKYWARD_TEST_SSHD_PORT", "2222"))
ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# Packages of the test wheelhouse: what the agent imports, plus joblib (the joblib plugin's
# pin) and threadpoolctl (a marker a task can import to prove the offline install).
WHEELHOUSE_PACKAGES = ("cloudpickle", "lz4", "joblib", "threadpoolctl")


class SSHDError(RuntimeError):
    """A test daemon could not be started."""


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
        raise SSHDError(
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
    deadline = time.monotonic() + 10
    while proc.poll() is None and not _listening(address, port):
        if time.monotonic() > deadline:
            stop_sshd(proc)
            raise SSHDError(f"sshd on {address}:{port} did not start listening within 10 s")
        time.sleep(0.05)
    if proc.poll() is not None:
        text = (workdir / f"{name}.log").read_text(errors="replace")
        raise SSHDError(f"sshd on {address}:{port} exited ({proc.returncode}):\n{text[-2000:]}")
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


@contextmanager
def sshd_cluster(addresses: Sequence[str] = ADDRESSES, port: int = PORT) -> Iterator[SSHDCluster]:
    """Start one daemon per address; stop them all (and their sessions) on exit."""
    os.makedirs("/run/sshd", exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="skyward-sshd-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client_key = workdir / "client_key"
        authorized = workdir / "authorized_keys"
        authorized.write_text(write_keypair(client_key) + "\n")
        hosts = []
        for address in addresses:
            host_key = workdir / f"host_key_{address}"
            public = write_keypair(host_key)
            proc = start_sshd(address, port, host_key, authorized, workdir)
            procs.append(proc)
            hosts.append(SSHDHost(address, port, proc.pid, str(host_key), public))
        known_hosts = workdir / "known_hosts"
        known_hosts.write_text("".join(h.known_hosts_line for h in hosts))
        yield SSHDCluster(
            tuple(hosts), getpass.getuser(), str(client_key), str(known_hosts), str(workdir)
        )
    finally:
        for proc in procs:
            stop_sshd(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def repacked_wheelhouse() -> Iterator[str]:
    """A wheelhouse repacked from this interpreter's installed distributions (no network)."""
    folder = Path(tempfile.mkdtemp(prefix="skyward-wheelhouse-"))
    try:
        for name in WHEELHOUSE_PACKAGES:
            wheel_from_installed(name, folder)
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
