"""``doctor ssh``: for each host, is it reachable, is its host key known, does the login
work, is the right Python there with an installer, and is there room for environments.

The hosts are opened through :class:`~skyward.providers.ssh.SSH`'s own launchers (ssh
config, jump hosts and host-key policy included), so a host that passes here connects
the same way in a ``Compute``. Every connection is closed before the checks return.
"""

from __future__ import annotations

import json
import shlex
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import paramiko

from skyward.bootstrap.remote import run_remote
from skyward.doctor import Check, fail, ok
from skyward.errors import HostKeyError, NodeStartError
from skyward.providers import ClusterSpec
from skyward.providers.ssh import HostLauncher
from skyward.spec import Image, Worker

if TYPE_CHECKING:
    from skyward.providers.ssh import SSH

__all__ = ["check_ssh"]

PROBE_TIMEOUT = 60.0
GIB = 1024**3

# Run on the host by its Python (standard library only): what the bootstrap will need.
_PROBE = """
import importlib.util, json, os, shutil, sys
path = os.path.abspath(os.path.expanduser(sys.argv[1]))
while not os.path.exists(path):
    path = os.path.dirname(path)
beside = os.path.join(os.path.dirname(sys.executable), "uv")
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "executable": sys.executable,
    "uv": beside if os.access(beside, os.X_OK) else shutil.which("uv"),
    "venv": all(importlib.util.find_spec(m) is not None for m in ("venv", "ensurepip")),
    "free": shutil.disk_usage(path).free,
    "path": path,
}))
"""


def check_ssh(provider: SSH, *, min_free_gb: float = 2.0) -> list[Check]:
    """Check every host of ``provider`` (in parallel); the checks in host order."""
    spec = ClusterSpec(len(provider.hosts), Worker(), Image(), "doctor")
    with ExitStack() as stack:
        launchers = [
            launcher
            for launcher in provider.launch(spec, stack)
            if isinstance(launcher, HostLauncher)
        ]
        with ThreadPoolExecutor(min(8, len(launchers)), "skyward-doctor") as pool:
            found = pool.map(
                lambda launcher: _check_host(launcher, provider.python, min_free_gb), launchers
            )
            return [check for checks in found for check in checks]


def _check_host(launcher: HostLauncher, python: str, min_free_gb: float) -> list[Check]:
    try:
        checks, client = _connect(launcher)
        if client is None:
            return checks
        return checks + _environment(launcher.name, client, python, launcher.env_root, min_free_gb)
    finally:
        launcher.close()


def _connect(launcher: HostLauncher) -> tuple[list[Check], paramiko.SSHClient | None]:
    """reachable, host key, login (up to the first failure) and the open connection."""
    name, where = launcher.name, f"{launcher.hostname}:{launcher.port}"
    checks: list[Check] = []
    if launcher.jump is None:  # through a jump host, only the jump host can tell
        try:
            with socket.create_connection(
                (launcher.hostname, launcher.port), launcher.connect_timeout
            ):
                pass
        except OSError as exc:
            return [
                fail(
                    name, "reachable", f"cannot connect to {where}: {type(exc).__name__}: {exc}",
                    f"check the address and port (--port or the ssh config), that sshd runs on "
                    f"the host (`ssh -p {launcher.port} {launcher.hostname}`), and that no "
                    "firewall blocks it",
                )
            ], None  # fmt: skip
        checks.append(ok(name, "reachable", f"{where} accepts TCP connections"))
    try:
        client = launcher.connect()
    except HostKeyError as exc:
        return checks + [
            fail(
                name, "host key", str(exc),
                "compare the fingerprint with the host's own, then trust it as shown, or "
                "pass --known-hosts FILE",
            )
        ], None  # fmt: skip
    except NodeStartError as exc:
        if isinstance(exc.__context__, paramiko.AuthenticationException):
            return checks + [
                fail(
                    name, "login", str(exc),
                    f"check the user name ({launcher.username!r}; --user or the ssh config's "
                    "User) and the key (--key, IdentityFile, or `ssh-add` it to your agent)",
                )
            ], None  # fmt: skip
        return checks + [
            fail(
                name, "connect", str(exc),
                "check the host, its port and any jump host (ProxyJump) in the ssh config",
            )
        ], None  # fmt: skip
    transport = client.get_transport()
    key = transport.get_remote_server_key() if transport is not None else None
    trusted = f"{key.get_name()} {key.fingerprint}" if key is not None else "checked"
    return checks + [
        ok(name, "host key", f"trusted ({trusted})"),
        ok(name, "login", f"logged in as {launcher.username}"),
    ], client


def _environment(
    name: str, client: paramiko.SSHClient, python: str, env_root: str, min_free_gb: float
) -> list[Check]:
    """python, installer, disk: one remote command run by the hosts' ``python``."""
    command = " ".join(shlex.quote(a) for a in [python, "-c", _PROBE, env_root])
    try:
        code, out, err = run_remote(client, command, PROBE_TIMEOUT)
        found: dict[str, Any] = json.loads(out.strip().splitlines()[-1]) if code == 0 else {}
    except (OSError, TimeoutError, EOFError, ValueError, IndexError) as exc:
        code, found, err = -1, {}, f"{type(exc).__name__}: {exc}"
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not found:
        return [
            fail(
                name, "python", f"{python} did not run ({(err.strip() or f'exit {code}')[-300:]})",
                f"install Python {mine} on the host or pass --python /path/to/python{mine} "
                "(sky.SSH(python=...))",
            )
        ]  # fmt: skip
    version = ".".join(str(v) for v in found["version"])
    checks = []
    if version.rsplit(".", 1)[0] != mine:
        checks.append(
            fail(
                name, "python", f"{python} is Python {version} ({found['executable']}), the "
                f"client runs {mine}: pickled tasks do not cross minor versions",
                f"pass --python /path/to/python{mine} (sky.SSH(python=...)) or run the client "
                f"with Python {version.rsplit('.', 1)[0]}",
            )
        )  # fmt: skip
    else:
        checks.append(ok(name, "python", f"{version} at {found['executable']}"))
    if found["uv"]:
        checks.append(ok(name, "installer", f"uv at {found['uv']}"))
    elif found["venv"]:
        checks.append(ok(name, "installer", "python -m venv + pip (no uv: slower installs)"))
    else:
        checks.append(
            fail(
                name, "installer", f"neither uv nor the venv module (with ensurepip) for {python}",
                "install uv on the host (https://docs.astral.sh/uv/) or the python3-venv package",
            )
        )  # fmt: skip
    free = found["free"] / GIB
    where = f"{free:.1f} GiB free in {found['path']} (env_root {env_root})"
    if free < min_free_gb:
        checks.append(
            fail(
                name, "disk", f"only {where}; {min_free_gb:g} GiB wanted",
                "free space there, or put the environments on a larger filesystem with "
                "sky.SSH(env_root=...) (--env-root)",
            )
        )  # fmt: skip
    else:
        checks.append(ok(name, "disk", where))
    return checks
