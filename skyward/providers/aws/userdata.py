"""The instances' cloud-init user data, rendered from the shell and systemd templates in
``templates/`` (package data: ``{name}`` fields are filled with :meth:`str.format`)."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

from skyward.providers.aws.keys import KeyPair

__all__ = ["REMOTE_PYTHON", "SETUP_PENDING", "STATE_DIR", "render_user_data", "render_wrapper"]

REMOTE_PYTHON = "/usr/local/bin/skyward-python"
SETUP_PENDING = "skyward: instance set-up still running"
STATE_DIR = "/var/lib/skyward"


@cache
def template(name: str) -> str:
    """The text of ``templates/<name>``."""
    return (files("skyward.providers.aws") / "templates" / name).read_text(encoding="utf-8")


def render_wrapper(state_dir: str = STATE_DIR, wait_seconds: int = 45) -> str:
    """The interpreter wrapper installed at :data:`REMOTE_PYTHON` by the user data.

    It runs ``$(cat <state_dir>/python)`` once ``<state_dir>/ready`` exists, reports a
    failed set-up, or exits with :data:`SETUP_PENDING` on stderr after ``wait_seconds``
    (less than the client's probe timeout; the client retries while it says so).
    """
    return template("wrapper.sh").format(state=state_dir, wait=wait_seconds, pending=SETUP_PENDING)


def render_user_data(host_key: KeyPair, python: str, idle_shutdown_minutes: float) -> str:
    """The instance's cloud-init user data (``#cloud-config`` in JSON, a subset of YAML).

    It installs ``host_key`` as the only SSH host key, arms the dead-man switch first,
    then installs uv and Python ``python`` behind :data:`REMOTE_PYTHON`.
    """
    kind = host_key.cloud_init_kind
    seconds = max(60, round(idle_shutdown_minutes * 60))
    setup = template("setup.sh").format(python=python, wrapper=REMOTE_PYTHON, state=STATE_DIR)
    config = {
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {f"{kind}_private": host_key.private, f"{kind}_public": host_key.public},
        "disable_root": True,
        "write_files": [
            {"path": "/usr/local/sbin/skyward-deadman", "permissions": "0755",
             "content": template("deadman.sh")},
            {"path": "/etc/systemd/system/skyward-deadman.service", "permissions": "0644",
             "content": template("deadman.service").format(seconds=seconds)},
            {"path": "/etc/ssh/sshd_config.d/60-skyward.conf", "permissions": "0644",
             "content": template("sshd.conf")},
            {"path": "/usr/local/sbin/skyward-setup", "permissions": "0755", "content": setup},
            {"path": REMOTE_PYTHON, "permissions": "0755", "content": render_wrapper()},
        ],
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "skyward-deadman.service"],
            ["/usr/local/sbin/skyward-setup"],
        ],
    }  # fmt: skip
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"
