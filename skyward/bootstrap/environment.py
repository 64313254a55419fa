"""One image's environment on a host: what it holds, how a warm start checks it, and
preparing it (probe, upload what is missing, install) from the client."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyward.bootstrap import host, remote
from skyward.bootstrap.wheels import ClientWheels
from skyward.channel import AGENT_PID_MARK
from skyward.errors import BootstrapError
from skyward.spec import requirement_name

if TYPE_CHECKING:
    import paramiko

    from skyward.spec import Image

__all__ = ["INSTALL_STEPS", "NOT_READY", "Plan", "agent_command", "prepare"]

# Steps that change the host; a warm start logs none of them.
INSTALL_STEPS = ("upload", "create venv", "install packages", "install skyward")
PROBE_TIMEOUT = 60.0
PREPARE_TIMEOUT = 1800.0

NOT_READY = 97
"""Exit status of :func:`agent_command` when the environment must be prepared first."""


@dataclass(frozen=True)
class Plan:
    """What the environment of one image holds, and the markers that say it is ready."""

    image: Image
    digest: str
    install_key: str
    code: str
    packages: tuple[str, ...]

    @classmethod
    def of(cls, image: Image) -> Plan:
        """The plan for ``image`` with this client's skyward build."""
        wheels = ClientWheels.shared()
        packages = _packages(image, exclude={requirement_name(d) for d in wheels.packages})
        # The folder is named by the image; the marker inside also covers the agent's own
        # dependencies (pinned like the client), so a client upgrade rebuilds the env.
        key = hashlib.sha256(json.dumps([image.digest(), packages]).encode()).hexdigest()
        return cls(image, image.digest(), key[:16], wheels.code, tuple(packages))

    def args(self, env_root: str) -> dict[str, Any]:
        """Arguments of the host-side commands."""
        return {
            "env_root": env_root,
            "digest": self.digest,
            "install_key": self.install_key,
            "code": self.code,
        }


def _packages(image: Image, exclude: set[str]) -> list[str]:
    """The image's requirements plus what the agent itself imports (pinned like the client),
    without the distributions in ``exclude`` (shipped as the client's own wheels)."""
    import cloudpickle

    wanted = [r for r in image.pip if requirement_name(r) not in exclude]
    names = {requirement_name(r) for r in wanted}
    agent_needs = {
        "cloudpickle": f"cloudpickle=={cloudpickle.__version__}",
        "lz4": "lz4>=4.0",
    }
    return wanted + [req for name, req in agent_needs.items() if name not in names]


def _shell_path(path: str) -> str:
    """``path`` quoted for sh, with a leading ``~`` expanded by the host's shell."""
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + shlex.quote(path[1:]) if len(path) > 1 else '"$HOME"'
    return shlex.quote(path)


def agent_command(plan: Plan, env_root: str) -> str:
    """Shell command that starts the agent if the environment is ready, else exits
    :data:`NOT_READY`: a warm start costs one remote command, not two.

    "Ready" includes ``env_root`` being private (owned by the login user, not writable
    by group or others): an environment others could have planted is never run; the
    bootstrap that follows reports why.
    """
    root = _shell_path(env_root.rstrip("/") or "/")
    # sh (not the login shell, which may be slow or print) announces its pid, which
    # exec keeps for the agent, on stderr. `ls -ldn` gives the mode ($1) and owner ($3).
    script = (
        f'R={root}; E="$R"/{plan.digest}; '
        f'{{ set -- $(ls -ldn "$R/") && [ "$3" = "$(id -u)" ] && '
        'case "$1" in ?????w*|????????w*) false ;; esac && '
        f'[ -x "$E/bin/python" ] && read -r I < "$E/{host.IMAGE_MARKER}" && read -r C < '
        f'"$E/{host.CODE_MARKER}" && [ "$I" = {plan.install_key} ] && [ "$C" = {plan.code} ]; }} '
        f"2>/dev/null || exit {NOT_READY}; "
        f"echo {AGENT_PID_MARK.decode()}$$ >&2; "
        'exec env PYTHONUNBUFFERED=1 "$E/bin/python" -m skyward.agent'
    )
    return f"exec sh -c {shlex.quote(script)}"


def prepare(
    client: paramiko.SSHClient,
    name: str,
    plan: Plan,
    python: str,
    env_root: str,
    logger: Callable[[str, str], None],
) -> None:
    """Create or complete ``plan``'s environment on the host ``name`` with its ``python``.

    ``logger(step, message)`` is called for every step. Raises :class:`BootstrapError`.
    """
    image = plan.image
    base = plan.args(env_root)
    logger("probe", f"checking {env_root}/{plan.digest} with {python}")
    probe = remote.call(client, python, "probe", base, PROBE_TIMEOUT, "probe")
    version = ".".join(probe["python"].split(".")[:2])
    if version != image.python:
        raise BootstrapError(
            f"{python} on {name} is Python {probe['python']} but the image needs "
            f"{image.python}: pass sky.SSH(python='/path/to/python{image.python}') or "
            f"sky.Image(python='{version}') (the client must run the same minor version)",
            "probe",
        )
    if probe["ready"]:
        return  # another client finished it meanwhile
    wheels = ClientWheels.shared()
    files = _local_files(image, wheels)
    uploads = _uploads(files, probe)
    if uploads:
        logger("upload", f"uploading {len(uploads)} file(s) over SFTP")
        remote.upload(client, uploads)
    args = {
        **base,
        "packages": list(plan.packages),
        "offline": image.wheelhouse is not None,
        # The image's variables reach the installer too (PIP_INDEX_URL, UV_INDEX_URL, ...).
        "env": dict(image.env),
        # name -> sha256: the host checks each file against it before installing it.
        **{folder: {p.name: h for p, h in hashes.items()} for folder, hashes in files.items()},
    }
    installer = "uv" if probe["uv"] else "python -m venv + pip"
    logger("prepare", f"preparing environment {plan.digest} with {installer}")

    def progress(line: str) -> None:
        if line.startswith(host.STEP_MARK):
            step = line[len(host.STEP_MARK) :]
            logger(step, f"{step} ({installer})")

    remote.call(client, python, "prepare", args, PREPARE_TIMEOUT, "prepare", progress)


def _local_files(image: Image, wheels: ClientWheels) -> dict[str, dict[Path, str]]:
    """The files the environment needs, by host folder (``wheels``: the client's code,
    ``wheelhouse``: the image's), each with its sha256."""
    found = {"wheels": list(wheels.paths), "wheelhouse": []}
    if image.wheelhouse is not None:
        found["wheelhouse"] = [p for p in sorted(Path(image.wheelhouse).iterdir()) if p.is_file()]
    return {
        folder: {path: host.file_sha256(str(path)) for path in paths}
        for folder, paths in found.items()
    }


def _uploads(files: dict[str, dict[Path, str]], probe: dict[str, Any]) -> list[tuple[Path, str]]:
    """``(local file, path on the host)`` of the files the host does not hold with the same
    content (by sha256: a file of the same size is not the same file)."""
    present: dict[str, str] = probe["present"]
    return [
        (local, f"{probe[folder]}/{local.name}")
        for folder, hashes in files.items()
        for local, sha256 in hashes.items()
        if present.get(f"{probe[folder]}/{local.name}") != sha256
    ]
