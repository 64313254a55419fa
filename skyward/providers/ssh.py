"""``sky.SSH(hosts=[...])``: nodes on machines you already have, reached over SSH.

Each node is one paramiko connection. The host's environment is prepared by
:mod:`skyward.bootstrap`, then the agent runs in an exec channel whose
stdin/stdout carry the same frames as a local agent's pipes. Nothing listens
on the hosts: the SSH channel is the only way in, and the agent exits when it
closes. Host keys are checked against ``known_hosts`` and the system-wide
``/etc/ssh/ssh_known_hosts`` (:mod:`skyward.providers.known_hosts`, which honours
``@revoked`` lines): an unknown, changed or revoked key is an error that says how to
trust the host.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import paramiko

from skyward import bootstrap
from skyward.channel import Channel, SSHChannel
from skyward.errors import HostKeyError, NodeStartError
from skyward.providers import ClusterSpec, Launcher, Provider
from skyward.providers.known_hosts import (
    SYSTEM_KNOWN_HOSTS,
    KnownHosts,
    RejectUnknown,
    revoked_error,
)
from skyward.providers.ssh_config import Host
from skyward.providers.ssh_config import load as load_ssh_config
from skyward.providers.ssh_config import resolve as resolve_host
from skyward.spec import Image
from skyward.waits import retries

__all__ = ["SSH", "Host", "HostKeyError", "HostLauncher"]

log = logging.getLogger("skyward.bootstrap")

DEFAULT_ENV_ROOT = "~/.cache/skyward/envs"
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# A frame stream benefits from a large window: big blobs flow without waiting for acks.
WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 32 * 1024
# Seconds between connection attempts to a host that refuses them (still booting).
REFUSED_RETRY = 0.5

# AES-GCM encrypts and authenticates in one pass (AES-NI): cheaper per packet than
# AES-CTR plus a separate HMAC, which paramiko would otherwise pick first.
FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _fast_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A transport that offers AES-GCM first (SSH uses the first client cipher the server knows)."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    known = tuple(options.ciphers)
    options.ciphers = tuple(c for c in FAST_CIPHERS if c in known) + tuple(
        c for c in known if c not in FAST_CIPHERS
    )
    return transport


@dataclass(frozen=True)
class SSH(Provider):
    """Run one node on each of ``hosts`` over SSH.

    Hosts are looked up in your OpenSSH client configuration like ``ssh`` does (aliases,
    ``HostName``, ``User``, ``Port``, ``IdentityFile``, ``ProxyJump``; see
    :mod:`skyward.providers.ssh_config`); explicit arguments win over it.

    Args:
        hosts: ``"host"``, ``"user@host"``, ``"host:port"`` entries (or ssh config aliases);
            ``Compute(nodes=n)`` uses the first ``n`` of them.
        user: login name for hosts that do not give one (default: the ssh config's, else
            your local user name).
        port: SSH port for hosts that do not give one (default: the ssh config's, else 22).
        key_filename: private key file (``~`` is expanded), used alone; by default the ssh
            config's ``IdentityFile`` and your SSH agent, else ``~/.ssh/id_*``.
        known_hosts: file of trusted host keys, for every host and jump host (default
            ``~/.ssh/known_hosts``; ``~`` is expanded).
        system_known_hosts: the system-wide file of trusted host keys, read too (its
            entries lose to ``known_hosts``'s for one host and key type); ``None``
            reads only ``known_hosts``.
        python: interpreter on the hosts used to create the environment; it must be the
            client's Python minor version.
        connect_timeout: seconds to connect and authenticate to each host (and to each
            jump host on the way).
        env_root: folder on the hosts holding one environment per image; it must be
            private to the login user (owned by it, not writable by group or others).
        ssh_config: OpenSSH client configuration file (default ``~/.ssh/config`` when it
            exists; ``"none"`` reads none).
    """

    hosts: Sequence[str]
    user: str | None = None
    port: int | None = None
    key_filename: str | None = None
    known_hosts: str | None = None
    system_known_hosts: str | None = SYSTEM_KNOWN_HOSTS
    python: str = "python3"
    connect_timeout: float = 30.0
    env_root: str = DEFAULT_ENV_ROOT
    ssh_config: str | None = None
    _parsed: tuple[Host, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.hosts, str):
            raise TypeError(f"SSH(hosts=...) takes a list of hosts, got the string {self.hosts!r}")
        hosts = tuple(self.hosts)
        if not hosts:
            raise ValueError("SSH(hosts=[]) is empty: give at least one 'user@host'")
        object.__setattr__(self, "hosts", hosts)
        config = load_ssh_config(self.ssh_config)
        parsed = tuple(resolve_host(h, config, user=self.user, port=self.port) for h in hosts)
        object.__setattr__(self, "_parsed", parsed)

    @property
    def resolved(self) -> tuple[Host, ...]:
        """Where each of ``hosts`` leads (address, login, keys, jump hosts)."""
        return self._parsed

    def check(self, spec: ClusterSpec) -> None:
        """Refuse more nodes than hosts."""
        if spec.nodes > len(self.hosts):
            raise ValueError(
                f"Compute(nodes={spec.nodes}) needs {spec.nodes} hosts but sky.SSH has "
                f"{len(self.hosts)}: pass nodes={len(self.hosts)} or fewer, or add hosts"
            )

    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        """One launcher per node on the first ``spec.nodes`` hosts; connections close on exit."""
        labels = [h.label for h in self._parsed[: spec.nodes]]
        launchers: list[Launcher] = []
        for i, host in enumerate(self._parsed[: spec.nodes]):
            name = host.label
            if labels.count(name) > 1:
                name = f"{name}#{labels[:i].count(name) + 1}"
            jump: HostLauncher | None = None
            for hop in host.jumps:  # ssh's -l, -p and -i do not apply to jump hosts
                jump = self._launcher(f"{hop.label} (jump host of {name})", hop, spec, jump)
            launcher = self._launcher(name, host, spec, jump, self.key_filename)
            cleanup.callback(launcher.close)
            launchers.append(launcher)
        return launchers

    def _launcher(
        self,
        name: str,
        host: Host,
        spec: ClusterSpec,
        jump: HostLauncher | None,
        key_filename: str | None = None,
    ) -> HostLauncher:
        return HostLauncher(
            name,
            host.hostname,
            host.port,
            host.username,
            image=spec.image,
            key_filename=key_filename,
            identity_files=() if key_filename else host.identity_files,
            identities_only=host.identities_only,
            jump=jump,
            known_hosts=self.known_hosts,
            system_known_hosts=self.system_known_hosts,
            python=self.python,
            connect_timeout=self.connect_timeout,
            env_root=self.env_root,
        )


class HostLauncher(Launcher):
    """Connects to one host, prepares its environment and starts the agent there.

    Args:
        name: the node name (prefix of its forwarded output).
        hostname, port, username: where to log in (username defaults to the local user).
        image: what the node's environment holds.
        pkey, key_filename: client key, used alone (else the SSH agent and ``~/.ssh/id_*``).
        identity_files: keys to try besides the SSH agent's when neither ``pkey`` nor
            ``key_filename`` is given (the ssh config's ``IdentityFile``; missing files are
            skipped, as ssh does); with ``identities_only`` the agent is not asked.
        jump: the launcher of the jump host this host is reached through (ProxyJump): its
            connection carries this one in a ``direct-tcpip`` channel, its host key is
            checked too, and closing this launcher closes it.
        host_keys: pinned host keys; when given, only these are accepted. Entries are
            named like known_hosts lines: ``host`` or ``[host]:port`` (an entry for the
            bare ``hostname`` also applies to a non-default ``port``).
        known_hosts: trusted host keys file when ``host_keys`` is not given
            (default ``~/.ssh/known_hosts``).
        system_known_hosts: system-wide trusted host keys file, read after
            ``known_hosts`` when ``host_keys`` is not given (``None``: not read).
        python: interpreter on the host that creates the environment.
        connect_timeout: seconds to connect and authenticate.
        env_root: folder on the host holding the environments.
    """

    def __init__(
        self,
        name: str,
        hostname: str,
        port: int = 22,
        username: str | None = None,
        *,
        image: Image,
        pkey: paramiko.PKey | None = None,
        key_filename: str | None = None,
        identity_files: Sequence[str] = (),
        identities_only: bool = False,
        jump: HostLauncher | None = None,
        host_keys: paramiko.HostKeys | None = None,
        known_hosts: str | None = None,
        system_known_hosts: str | None = SYSTEM_KNOWN_HOSTS,
        python: str = "python3",
        connect_timeout: float = 30.0,
        env_root: str = DEFAULT_ENV_ROOT,
    ) -> None:
        self.name = name
        self.hostname = hostname
        self.port = port
        self.username = username or getpass.getuser()
        self.image = image
        self.pkey = pkey
        self.key_filename = key_filename
        self.identity_files = tuple(identity_files)
        self.identities_only = identities_only
        self.jump = jump
        self.host_keys = host_keys
        self.known_hosts = known_hosts
        self.system_known_hosts = system_known_hosts
        self.python = python
        self.connect_timeout = connect_timeout
        self.env_root = env_root
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<HostLauncher {self.name} {self.username}@{self.hostname}:{self.port}>"

    def _log(self, step: str, message: str) -> None:
        log.info("%s: %s", self.name, message, extra={"host": self.name, "step": step})

    def _fail(self, step: str, message: str) -> NodeStartError:
        return NodeStartError(f"{self.name}: {message} (step: {step})")

    def open(self) -> Channel:
        """Connect, prepare the environment if needed, start the agent; return its channel."""
        try:
            client = self._connect()
            plan = bootstrap.Plan.of(self.image)
            command = bootstrap.agent_command(plan, self.env_root)
            # Optimistic: a ready environment starts the agent in this one remote command.
            channel = self._start_agent(client, command)
            if channel.started(self.connect_timeout):
                self._log("ready", f"environment {plan.digest} is ready (warm start)")
                return channel
            self._not_ready(channel)
            try:
                bootstrap.prepare(client, self.name, plan, self.python, self.env_root, self._log)
            except bootstrap.BootstrapError as exc:
                raise self._fail(exc.step, str(exc)) from exc
            channel = self._start_agent(client, command)
            if channel.started(self.connect_timeout):
                return channel
            self._not_ready(channel)
            raise self._fail("start agent", "the environment is still not ready after preparing it")
        except BaseException:
            self.close()
            raise

    def _not_ready(self, channel: SSHChannel) -> None:
        """Check that ``channel``'s command ended for want of an environment, then drop it."""
        done = channel.channel.status_event.wait(5.0)
        status = channel.channel.exit_status if done else None
        channel.close(0.5)
        if status != bootstrap.NOT_READY:
            raise self._fail(
                "start agent",
                f"the agent did not start (exit status {status}; see its stderr above)",
            )

    def _connect(self) -> paramiko.SSHClient:
        t0 = time.monotonic()
        via = f" through {self.jump.hostname}:{self.jump.port}" if self.jump else ""
        self._log("connect", f"connecting to {self.username}@{self.hostname}:{self.port}{via}")
        client = paramiko.SSHClient()
        known: KnownHosts | None = None
        if self.host_keys is not None:
            keys = client.get_host_keys()
            for entry, by_type in self.host_keys.items():
                # A key pinned for the bare address also counts for a non-default port.
                names = {entry, self._known_hosts_name() if entry == self.hostname else entry}
                for key in by_type.values():
                    for name in names:
                        keys.add(name, key.get_name(), key)
            source = "the pinned host keys"
        else:
            path = os.path.expanduser(self.known_hosts or DEFAULT_KNOWN_HOSTS)
            if self.known_hosts is not None and not os.path.exists(path):
                raise self._fail("connect", f"known_hosts file {path} does not exist")
            system = self.system_known_hosts
            known = KnownHosts([path] if system is None else [path, os.path.expanduser(system)])
            name = self._known_hosts_name()
            for key in known.trusted(name):
                client.get_host_keys().add(name, key.get_name(), key)
            source = " or ".join([path, *(p for p in known.paths if p != path)])
        client.set_missing_host_key_policy(RejectUnknown(self.name, source, known))
        key_files = self._key_files()
        with self._lock:
            if self._closed:
                raise self._fail("connect", "the cluster is shutting down")
            previous, self._client = self._client, client
        if previous is not None:  # a restart: the lost node's connection goes
            previous.close()
        try:
            sock = self._socket()
            client.connect(
                self.hostname,
                self.port,
                self.username,
                pkey=self.pkey,
                key_filename=key_files or None,  # type: ignore[arg-type]  # a list works
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                sock=sock,
                look_for_keys=self.pkey is None
                and not self.key_filename
                and not self.identity_files,
                allow_agent=self.pkey is None
                and not self.key_filename
                and not self.identities_only,
                transport_factory=_fast_transport,
            )
        except paramiko.BadHostKeyException as exc:
            name = self._known_hosts_name()
            revoked = known.revoked(name, exc.key) if known is not None else None
            if revoked is not None:
                raise revoked_error(self.name, name, exc.key, revoked) from None
            if self.host_keys is None:
                fix = (
                    f"if the host was reinstalled, remove the old key with `ssh-keygen -R "
                    f"'{self._known_hosts_name()}' -f {source}` and trust the new one"
                )
            else:
                fix = "if the host was replaced, pin its new key"
            raise HostKeyError(
                f"{self.name}: host key CHANGED: trusted ({source}): {exc.expected_key.get_name()} "
                f"{exc.expected_key.fingerprint}, offered by the host: {exc.key.get_name()} "
                f"{exc.key.fingerprint}. Someone may be intercepting the connection; {fix} "
                "(step: connect)"
            ) from None
        except paramiko.AuthenticationException as exc:
            raise self._fail(
                "connect",
                f"authentication as {self.username!r} failed ({exc}): pass "
                "sky.SSH(key_filename=...) or load the key in your SSH agent, and check the "
                "user name",
            ) from None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._fail(
                "connect",
                f"cannot connect to {self.hostname}:{self.port}: {type(exc).__name__}: {exc}",
            ) from None
        with self._lock:
            aborted = self._closed
        if aborted:  # closed while connecting, before there was a transport to close
            client.close()
            raise self._fail("connect", "the cluster is shutting down")
        self._log("connect", f"connected in {time.monotonic() - t0:.2f}s")
        return client

    def _known_hosts_name(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def _key_files(self) -> list[str]:
        """The key files to offer: ``key_filename`` (must exist), else the configured
        identity files that exist."""
        if self.key_filename:
            path = os.path.expanduser(self.key_filename)
            if not os.path.exists(path):
                raise self._fail(
                    "connect", f"key file {path} does not exist: check sky.SSH(key_filename=...)"
                )
            return [path]
        found = [path for path in self.identity_files if os.path.exists(path)]
        for path in sorted(set(self.identity_files) - set(found)):
            log.debug("%s: IdentityFile %s does not exist; skipped", self.name, path)
        return found

    def _socket(self) -> socket.socket | paramiko.Channel:
        if self.jump is not None:
            return self._jump_channel(self.jump)
        # A host still booting refuses connections: retried until connect_timeout.
        deadline = time.monotonic() + self.connect_timeout
        for left in retries(deadline, REFUSED_RETRY):
            try:
                sock = socket.create_connection((self.hostname, self.port), timeout=left or 0.1)
                break
            except ConnectionRefusedError:
                if left <= 0 or self._closed:
                    raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            # Unacknowledged data for 30 s fails the connection instead of hanging it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)
        return sock

    def _jump_channel(self, jump: HostLauncher) -> paramiko.Channel:
        """Log in to the jump host (its host key checked like any host's) and open a
        ``direct-tcpip`` channel from it to this host: the socket of this connection."""
        transport = jump.connect().get_transport()
        try:
            if transport is None or not transport.is_active():
                raise ConnectionError("the connection to the jump host was closed")
            return transport.open_channel(
                "direct-tcpip",
                (self.hostname, self.port),
                ("127.0.0.1", 0),
                timeout=self.connect_timeout,
            )
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._fail(
                "connect",
                f"the jump host {jump.hostname}:{jump.port} could not reach "
                f"{self.hostname}:{self.port} ({type(exc).__name__}: {exc}): check the "
                "HostName and Port as the jump host sees them, and that it may forward "
                "(AllowTcpForwarding in its sshd_config)",
            ) from None

    def connect(self) -> paramiko.SSHClient:
        """Connect and log in (through the jump hosts; every host key checked). The
        connection stays this launcher's: :meth:`close` ends it."""
        return self._connect()

    def _start_agent(self, client: paramiko.SSHClient, command: str) -> SSHChannel:
        self._log("start agent", f"starting the agent on {self.name}")
        try:
            transport = client.get_transport()
            if transport is None or not transport.is_active():
                raise ConnectionError("the SSH connection was closed")
            channel = transport.open_session(
                window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET, timeout=self.connect_timeout
            )
            channel.exec_command(command)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._fail("start agent", f"{type(exc).__name__}: {exc}") from None
        return SSHChannel(self.name, channel)

    def abort(self) -> None:
        """Close the connection, so an :meth:`open` in progress fails at once."""
        self.close()

    def close(self) -> None:
        """Close the SSH connection (agents on it get EOF and exit), then the jump host's.
        Idempotent."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.jump is not None:
            self.jump.close()
