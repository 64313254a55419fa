"""Trusted host keys as OpenSSH reads them, for :mod:`skyward.providers.ssh`.

Two files are read: the user's (``~/.ssh/known_hosts`` or ``SSH(known_hosts=...)``)
and the system-wide ``/etc/ssh/ssh_known_hosts``. Host patterns are matched like
OpenSSH does (``host``, ``[host]:port``, hashed ``|1|...`` names, ``*``/``?``
wildcards, ``!`` negation). paramiko alone ignores marker lines; here:

- ``@revoked <hosts> <key>``: that key is refused for those hosts, even when another
  line trusts it;
- ``@cert-authority <hosts> <key>``: host certificates are not supported (paramiko
  cannot verify them), so such a line trusts nothing; the error for an unknown host it
  covers says so and how to trust the host instead.

For one host and key type, a line of the user's file wins over the system file's.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import paramiko
from paramiko.pkey import UnknownKeyType

from skyward.errors import HostKeyError

__all__ = ["SYSTEM_KNOWN_HOSTS", "KnownHosts", "RejectUnknown", "host_matches", "revoked_error"]

SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def _hashed_match(name: str, pattern: str) -> bool:
    try:
        expected = paramiko.HostKeys.hash_host(name, pattern)
    except (binascii.Error, AssertionError, IndexError, ValueError):
        return False
    return hmac.compare_digest(expected, pattern)


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH's host pattern: ``*`` and ``?`` are wildcards, nothing else (``[`` is literal)."""
    parts = {"*": ".*", "?": "."}
    return re.compile("".join(parts.get(c, re.escape(c)) for c in pattern.lower()), re.DOTALL)


def host_matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether the known_hosts host field ``patterns`` covers ``name`` (``host`` or
    ``[host]:port``): some pattern matches and no negated (``!``) pattern does."""
    found = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            hit = _hashed_match(name, pattern)
        else:
            hit = _wildcard(pattern).fullmatch(name.lower()) is not None
        if hit and negated:
            return False
        found = found or hit
    return found


def _same(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


@dataclass(frozen=True)
class _Line:
    patterns: tuple[str, ...]
    key: paramiko.PKey | None  # None: a key type paramiko cannot read (@cert-authority)
    source: str


def _parse(path: str) -> tuple[list[_Line], list[_Line], list[_Line]]:
    """The trusted, ``@revoked`` and ``@cert-authority`` lines of one file."""
    trusted: list[_Line] = []
    revoked: list[_Line] = []
    authorities: list[_Line] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            fields = text.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = fields.pop(0) if fields[0].startswith("@") else None
            if len(fields) < 3:
                continue
            key = _key(fields[1], fields[2])
            line = _Line(tuple(fields[0].split(",")), key, f"{path} line {number}")
            if marker == "@revoked":
                revoked.append(line)
            elif marker == "@cert-authority":
                authorities.append(line)
            elif marker is None and key is not None:
                trusted.append(line)
    return trusted, revoked, authorities


def _key(kind: str, data: str) -> paramiko.PKey | None:
    try:
        return paramiko.PKey.from_type_string(kind, base64.b64decode(data))
    except (binascii.Error, ValueError, paramiko.SSHException, UnknownKeyType):
        return None  # e.g. a certificate authority's key type, or a damaged line


class KnownHosts:
    """The host keys trusted, revoked and delegated to a CA by a set of known_hosts files."""

    def __init__(self, paths: Sequence[str]) -> None:
        """Read ``paths`` in order of precedence (the user's file first); a missing file
        is skipped."""
        self.paths = [p for p in paths if os.path.exists(p)]
        self._trusted: list[_Line] = []
        self._revoked: list[_Line] = []
        self._authorities: list[_Line] = []
        for path in self.paths:
            trusted, revoked, authorities = _parse(path)
            self._trusted += trusted
            self._revoked += revoked
            self._authorities += authorities

    def trusted(self, name: str) -> list[paramiko.PKey]:
        """The keys trusted for ``name`` (``host`` or ``[host]:port``), revoked ones left
        out: one per key type (paramiko checks one), the first file's first line winning."""
        found: dict[str, paramiko.PKey] = {}
        for line in self._trusted:
            key = line.key
            if key is None or key.get_name() in found or not host_matches(name, line.patterns):
                continue
            if self.revoked(name, key) is None:
                found[key.get_name()] = key
        return list(found.values())

    def revoked(self, name: str, key: paramiko.PKey) -> str | None:
        """Where ``key`` is marked ``@revoked`` for ``name`` (``None`` if it is not)."""
        for line in self._revoked:
            if line.key is not None and _same(line.key, key) and host_matches(name, line.patterns):
                return line.source
        return None

    def authority_for(self, name: str) -> str | None:
        """Where a ``@cert-authority`` line covers ``name`` (``None`` if none does)."""
        for line in self._authorities:
            if host_matches(name, line.patterns):
                return line.source
        return None


class RejectUnknown(paramiko.MissingHostKeyPolicy):
    """Refuse a host key that ``known`` does not trust, saying why and how to trust it."""

    def __init__(self, name: str, source: str, known: KnownHosts | None) -> None:
        self.name = name
        self.source = source
        self.known = known

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        revoked = self.known.revoked(hostname, key) if self.known is not None else None
        if revoked is not None:
            raise revoked_error(self.name, hostname, key, revoked)
        authority = self.known.authority_for(hostname) if self.known is not None else None
        note = (
            f" ({authority} trusts a certificate authority for this host, but Skyward "
            "cannot check host certificates: trust the host's own key)"
            if authority is not None
            else ""
        )
        raise HostKeyError(
            f"{self.name}: host key not trusted: {hostname} is not in {self.source}{note}. It "
            f"offered a {key.get_name()} key with fingerprint {key.fingerprint}. If that is the "
            f"host's key (check with `ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub` on it), "
            f"trust it with `ssh-keyscan{_port_flag(hostname)} {_bare(hostname)} >> "
            f"~/.ssh/known_hosts` or pass sky.SSH(known_hosts='file') (step: connect)"
        )


def revoked_error(name: str, hostname: str, key: paramiko.PKey, where: str) -> HostKeyError:
    return HostKeyError(
        f"{name}: host key REVOKED: {hostname} offered the {key.get_name()} key "
        f"{key.fingerprint}, which {where} marks @revoked: it is never accepted. If the host "
        "has a new key, check it and trust that one (step: connect)"
    )


def _bare(hostname: str) -> str:
    match = re.fullmatch(r"\[(.+)\]:(\d+)", hostname)
    return match.group(1) if match else hostname


def _port_flag(hostname: str) -> str:
    match = re.fullmatch(r"\[(.+)\]:(\d+)", hostname)
    return f" -p {match.group(2)}" if match else ""
