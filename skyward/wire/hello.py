"""The ``HELLO`` exchange: what each side runs, and whether the two can share pickles."""

from __future__ import annotations

import platform
import sys
from typing import Any

import cloudpickle

from skyward.errors import VersionMismatchError
from skyward.wire.frames import PROTOCOL


def versions() -> dict[str, Any]:
    """What this side runs, exchanged in ``HELLO`` frames."""
    from skyward import __version__

    info: dict[str, Any] = {
        "protocol": PROTOCOL,
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "skyward": __version__,
        "cloudpickle": cloudpickle.__version__,
    }
    joblib = sys.modules.get("joblib")
    info["joblib"] = getattr(joblib, "__version__", None)
    return info


def check_compatible(local: dict[str, Any], remote: dict[str, Any], node: str) -> None:
    """Raise :class:`~skyward.errors.VersionMismatchError` when ``remote`` cannot unpickle
    what we send."""
    problems = []
    if remote.get("protocol") != local["protocol"]:
        problems.append(f"protocol {remote.get('protocol')} vs {local['protocol']}")
    lpy = ".".join(str(local["python"]).split(".")[:2])
    rpy = ".".join(str(remote.get("python", "?")).split(".")[:2])
    if lpy != rpy or remote.get("implementation") != local["implementation"]:
        problems.append(
            f"Python {remote.get('implementation')} {remote.get('python')} on the worker vs "
            f"{local['implementation']} {local['python']} on the client"
        )
    lcp = str(local["cloudpickle"]).split(".")[0]
    rcp = str(remote.get("cloudpickle", "?")).split(".")[0]
    if lcp != rcp:
        problems.append(f"cloudpickle {remote.get('cloudpickle')} vs {local['cloudpickle']}")
    if problems:
        raise VersionMismatchError(
            f"{node} cannot run tasks pickled by this client: {'; '.join(problems)}. "
            f"Use the same Python minor version on both sides (Image(python='{lpy}') or "
            "Local(python=...)) and the same cloudpickle major version"
        )
