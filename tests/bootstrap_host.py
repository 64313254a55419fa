"""Running the bootstrap's host side here, as the SSH provider runs it on a host (no SSH)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from skyward import bootstrap
from skyward.bootstrap import host, remote
from skyward.bootstrap.wheels import ClientWheels


def host_side(command: str, args: dict[str, Any], python: str = sys.executable) -> dict[str, Any]:
    """Run the host-side ``command`` with ``args`` on its stdin; its result or BootstrapError."""
    line = remote.remote_command(python, command)
    proc = subprocess.run(
        line, shell=True, capture_output=True, input=remote.encode_args(args), timeout=600
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    return remote.parse_result(command, proc.returncode, out, err)


def stage(plan: bootstrap.Plan, base: dict[str, Any], wheelhouse: str) -> dict[str, Any]:
    """Probe, then place the files as the SFTP upload does; return the prepare arguments."""
    probe = host_side("probe", base)
    assert probe["ready"] is False
    copied: dict[str, dict[str, str]] = {"wheels": {}, "wheelhouse": {}}
    sources = {"wheels": ClientWheels.shared().paths, "wheelhouse": Path(wheelhouse).iterdir()}
    for folder, files in sources.items():
        for path in files:
            shutil.copy(path, Path(probe[folder]) / path.name)
            copied[folder][path.name] = host.file_sha256(str(path))
    return {**base, "packages": list(plan.packages), "offline": True, "env": {}, **copied}
