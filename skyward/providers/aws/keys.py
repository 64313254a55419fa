"""SSH keys of a cluster: the login key pair, held in memory, and each instance's own
host key, read from the instance's console and pinned.

Why the console: user data is readable by anyone allowed ``ec2:DescribeInstanceAttribute``
and from the metadata service on the instance, so a host key handed over there could
impersonate the instance. Each instance instead generates its key at first boot and
prints the public half on its serial console (``templates/hostkey.sh``), which only the
instance itself writes and the client reads with ``ec2:GetConsoleOutput``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from skyward.errors import HostKeyError
from skyward.providers.aws import ec2 as api
from skyward.providers.aws.userdata import HOST_KEY_MARK
from skyward.waits import retries

Address = tuple[str, int]

_CONSOLE_LINE = re.compile(
    rf"^{HOST_KEY_MARK} (ssh-ed25519) ([A-Za-z0-9+/]+={{0,2}})\s*$", re.MULTILINE
)


@dataclass(frozen=True)
class KeyPair:
    """An SSH key pair held in memory: the OpenSSH private key text and its paramiko key."""

    private: str = field(repr=False)
    pkey: paramiko.PKey = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh Ed25519 key pair."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        text = (
            ed25519.Ed25519PrivateKey.generate()
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            .decode()
        )
        return cls(text, paramiko.Ed25519Key(file_obj=io.StringIO(text)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read an unencrypted private key file (OpenSSH or PEM format)."""
        path = Path(path).expanduser()
        return cls(path.read_text(), paramiko.PKey.from_path(path))

    @property
    def public(self) -> str:
        """The public key as one ``authorized_keys`` line: ``<type> <base64>``."""
        return f"{self.pkey.get_name()} {self.pkey.get_base64()}"


def pinned_host_keys(address: Address, host_key: paramiko.PKey) -> paramiko.HostKeys:
    """Known hosts holding only ``host_key`` for ``address``, as ssh looks it up."""
    host, port = address
    keys = paramiko.HostKeys()
    keys.add(host if port == 22 else f"[{host}]:{port}", host_key.get_name(), host_key)
    return keys


def console_host_keys(text: str) -> list[paramiko.PKey]:
    """The distinct host keys printed in console output ``text`` (lines
    ``SKYWARD-HOST-KEY ssh-ed25519 <base64>``), in order."""
    found: list[paramiko.PKey] = []
    for kind, data in _CONSOLE_LINE.findall(text.replace("\r", "")):
        try:
            key = paramiko.PKey.from_type_string(kind, base64.b64decode(data))
        except (binascii.Error, ValueError, paramiko.SSHException):
            continue  # a line cut short or garbled on the console
        if all(key.asbytes() != k.asbytes() for k in found):
            found.append(key)
    return found


class _Console:
    """Reads one instance's console output."""

    def __init__(self, ec2: Any, instance_id: str) -> None:
        self.ec2 = ec2
        self.instance_id = instance_id
        self.latest = True  # Nitro instances: the output as of now, not a buffered snapshot

    def read(self) -> str:
        try:
            if self.latest:
                reply = self.ec2.get_console_output(InstanceId=self.instance_id, Latest=True)
            else:
                reply = self.ec2.get_console_output(InstanceId=self.instance_id)
        except Exception as exc:
            code = api.error_code(exc)
            if self.latest and code in ("UnsupportedOperation", "InvalidParameterValue"):
                self.latest = False  # older (Xen) instance types have no "latest" output
                return ""
            if code == "UnauthorizedOperation":
                raise PermissionError(
                    f"{self.instance_id}: the credentials lack ec2:GetConsoleOutput, which "
                    "Skyward needs to read the instance's SSH host key: see the IAM policy in "
                    "Skyward's AWS docs"
                ) from exc
            raise
        return str(reply.get("Output") or "")  # botocore decodes the base64 already


def console_host_key(
    ec2: Any, instance_id: str, deadline: float, poll: float, stop: threading.Event
) -> paramiko.PKey:
    """The SSH host key instance ``instance_id`` printed on its console, polled until
    ``deadline`` (a ``time.monotonic()`` value) or ``stop``."""
    console = _Console(ec2, instance_id)
    for _ in retries(deadline, poll, stop=stop):
        keys = console_host_keys(console.read())
        if len(keys) > 1:
            shown = ", ".join(k.fingerprint for k in keys)
            raise HostKeyError(
                f"{instance_id}: its console shows {len(keys)} different SSH host keys "
                f"({shown}); refusing to guess which one is the instance's. Terminate it "
                "and start the cluster again (step: host key)"
            )
        if keys:
            return keys[0]
    if stop.is_set():
        raise RuntimeError(f"{instance_id}: the cluster is shutting down")
    raise TimeoutError(
        f"{instance_id}: the instance printed no SSH host key on its console before the "
        "start deadline (read with ec2:GetConsoleOutput). The AMI must run cloud-init; "
        "raise sky.AWS(start_timeout=...) for slow instance types (step: host key)"
    )
