"""Where an ``SSH(hosts=[...])`` entry leads, read from your OpenSSH client configuration
the way ``ssh`` reads it.

Honoured: ``Host`` and ``Match`` blocks (paramiko's :class:`~paramiko.SSHConfig`, first
value wins), ``HostName``, ``User``, ``Port``, ``IdentityFile`` (``~`` and ``%`` tokens
expanded), ``IdentitiesOnly`` and ``ProxyJump`` (chains too; each hop is looked up in
the same file). Precedence is ssh's: the entry's own ``user@`` and ``:port``, then the
explicit ``SSH(user=, port=, key_filename=)`` arguments (like ssh's command line), then
the configuration, then the defaults. ``ProxyCommand`` is refused rather than ignored;
other keywords are not used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import paramiko

__all__ = ["DEFAULT_SSH_CONFIG", "MAX_JUMPS", "Host", "load", "resolve"]

DEFAULT_SSH_CONFIG = "~/.ssh/config"
"""Read when ``SSH(ssh_config=None)`` and the file exists (``~`` is the client's home)."""

MAX_JUMPS = 8
"""Longest ProxyJump chain followed; a longer one is almost surely a loop in the file."""

_ENTRY = re.compile(
    r"(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:@\s\[\]]+))(?::(?P<port>\d+))?"
)


def split(text: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (``host`` may be ``[v6addr]``) as ``(user, host, port)``."""
    match = _ENTRY.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"invalid SSH host {text!r}: use 'host', 'user@host', 'host:port' or 'user@[ipv6]:port'"
        )
    port = match.group("port")
    return (
        match.group("user"),
        match.group("v6") or match.group("host"),
        int(port) if port else None,
    )


@dataclass(frozen=True)
class Host:
    """Where one entry of ``SSH(hosts=[...])`` (or one of its jump hosts) leads.

    Args:
        hostname: address to connect to (the configuration's ``HostName``).
        port: SSH port.
        username: login name (``None``: the local user name).
        alias: the name given, when the configuration maps it to another ``hostname``.
        identity_files: private keys from the configuration (``IdentityFile``).
        identities_only: use only those keys, not the SSH agent's (``IdentitiesOnly``).
        jumps: the ``ProxyJump`` hosts to go through, the first one connected to first.
    """

    hostname: str
    port: int
    username: str | None
    alias: str | None = None
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    jumps: tuple[Host, ...] = ()

    @classmethod
    def parse(cls, text: str, user: str | None, port: int) -> Host:
        """Parse ``host``, ``user@host``, ``host:port``, ``user@[v6addr]:port`` (no ssh config)."""
        given_user, hostname, given_port = split(text)
        return cls(hostname, given_port or port, given_user or user)

    @property
    def label(self) -> str:
        """The node name: the alias as given, else ``host`` or ``host:port``."""
        if self.alias is not None:
            return self.alias
        return self.hostname if self.port == 22 else f"{self.hostname}:{self.port}"


def load(path: str | None) -> paramiko.SSHConfig | None:
    """The configuration at ``path``; ``None`` reads :data:`DEFAULT_SSH_CONFIG` if it
    exists; ``"none"`` (like ``ssh -F none``) reads nothing."""
    if path is not None and path.lower() == "none":
        return None
    full = os.path.expanduser(path if path is not None else DEFAULT_SSH_CONFIG)
    if not os.path.exists(full):
        if path is None:
            return None
        raise ValueError(
            f"ssh config file {full} does not exist: fix sky.SSH(ssh_config=...) "
            "(or pass ssh_config='none' to read no configuration)"
        )
    try:
        return paramiko.SSHConfig.from_path(full)
    except (OSError, paramiko.ConfigParseError) as exc:
        raise ValueError(f"cannot read the ssh config {full}: {exc}") from exc


def resolve(
    text: str,
    config: paramiko.SSHConfig | None,
    *,
    user: str | None = None,
    port: int | None = None,
    follow_jumps: bool = True,
    _depth: int = 0,
) -> Host:
    """Resolve one ``[user@]host[:port]`` entry: explicit values first, then ``config``.

    ``user`` and ``port`` are the explicit ``SSH(user=, port=)`` (they do not apply to
    jump hosts, as ssh's ``-l``/``-p`` do not). With ``follow_jumps=False`` the entry's
    own ProxyJump is not followed (a hop of a chain is reached through the previous hop).
    """
    given_user, name, given_port = split(text)
    if config is None:
        return Host(name, given_port or port or 22, given_user or user)
    try:
        options = config.lookup(name)
    except ImportError as exc:  # 'Match exec' needs the optional 'invoke' package
        raise ValueError(f"{name}: the ssh config uses a feature paramiko lacks: {exc}") from exc
    if "proxyjump" not in options and options.get("proxycommand", "none").lower() != "none":
        raise ValueError(
            f"{name}: the ssh config gives a ProxyCommand, which Skyward does not run: "
            "use ProxyJump for a bastion host, or set ProxyCommand none for this host"
        )
    try:
        configured_port = int(options["port"]) if "port" in options else None
    except ValueError:
        raise ValueError(
            f"{name}: the ssh config's Port {options['port']!r} is not a number"
        ) from None
    hostname = options.get("hostname", name)
    jumps: tuple[Host, ...] = ()
    if follow_jumps:
        jumps = _jumps(name, options.get("proxyjump"), config, _depth)
    return Host(
        hostname,
        given_port or port or configured_port or 22,
        given_user or user or options.get("user"),
        alias=(name if given_port is None else f"{name}:{given_port}")
        if hostname != name
        else None,
        identity_files=tuple(os.path.expanduser(p) for p in options.get("identityfile", [])),
        identities_only=options.get("identitiesonly", "no").lower() == "yes",
        jumps=jumps,
    )


def _jumps(
    name: str, value: str | None, config: paramiko.SSHConfig, depth: int
) -> tuple[Host, ...]:
    """The flattened hops of ``ProxyJump value``: the first hop's own jumps come first."""
    if value is None or value.strip().lower() == "none":
        return ()
    if depth >= MAX_JUMPS:
        raise ValueError(
            f"{name}: ProxyJump goes through more than {MAX_JUMPS} hosts: the ssh config "
            "probably loops (give the jump host 'ProxyJump none')"
        )
    specs = [s.strip() for s in value.split(",") if s.strip()]
    first = resolve(specs[0], config, _depth=depth + 1)
    rest = [resolve(s, config, follow_jumps=False, _depth=depth + 1) for s in specs[1:]]
    return (*first.jumps, replace(first, jumps=()), *rest)
