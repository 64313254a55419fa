"""SSH keys of a cluster, held in memory: the login key pair and the pinned host key."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

Address = tuple[str, int]

_CLOUD_INIT_KEY_KINDS = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}


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

    @property
    def cloud_init_kind(self) -> str:
        """The key type as cloud-init's ``ssh_keys`` names it (``ed25519``, ``rsa``, ``ecdsa``)."""
        name = self.pkey.get_name()
        if name.startswith("ecdsa-"):
            return "ecdsa"
        if name not in _CLOUD_INIT_KEY_KINDS:
            raise ValueError(f"unsupported SSH host key type {name!r}: use ed25519, rsa or ecdsa")
        return _CLOUD_INIT_KEY_KINDS[name]


def pinned_host_keys(address: Address, host_key: paramiko.PKey) -> paramiko.HostKeys:
    """Known hosts holding only ``host_key`` for ``address``, as ssh looks it up."""
    host, port = address
    keys = paramiko.HostKeys()
    keys.add(host if port == 22 else f"[{host}]:{port}", host_key.get_name(), host_key)
    return keys
