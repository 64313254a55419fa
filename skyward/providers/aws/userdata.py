"""The instances' cloud-init user data, rendered from the shell and systemd files in
``templates/`` (package data: ``{name}`` fields are filled with :meth:`str.format`).

The user data holds no secret and no key: each instance generates its own SSH host
key at first boot and prints it on its serial console (:data:`HOST_KEY_MARK`), where
the client reads it (:func:`skyward.providers.aws.keys.console_host_key`).
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

__all__ = [
    "HOST_KEY_MARK",
    "REMOTE_PYTHON",
    "SETUP_PENDING",
    "STATE_DIR",
    "UV_VERSION",
    "UV_WHEELS",
    "render_user_data",
    "render_wrapper",
]

REMOTE_PYTHON = "/usr/local/bin/skyward-python"
SETUP_PENDING = "skyward: instance set-up still running"
STATE_DIR = "/var/lib/skyward"
DEADMAN = "/usr/local/sbin/skyward-deadman"
HOST_KEY_MARK = "SKYWARD-HOST-KEY"
"""Start of the console line that carries an instance's SSH host key."""

UV_VERSION = "0.13.9"
UV_WHEELS: dict[str, tuple[str, str]] = {
    "x86_64": (
        "https://files.pythonhosted.org/packages/3d/aa/26d64642d808de4a652579ef950d7cd2d37f080a8"
        "babf9c67c6b75fc4c3f/uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "d7f459fe4fd247d830351c75686d3996ace3c6f3f728eb0e85a30b7ada0cef19",
    ),
    "aarch64": (
        "https://files.pythonhosted.org/packages/57/15/94b6cd62ac3ff6550288328e8035288875197cbc1"
        "83f51554b266a69877b/uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64"
        ".musllinux_1_1_aarch64.whl",
        "5435c5ce14a56431208ca0996416d310f1598e8c2c8ba707688985a16bb82dbe",
    ),
}
"""The uv wheel (from PyPI) and its sha256 for each ``uname -m``: uv is installed from
this pinned release, checked before anything runs from it (PyPI's published hashes,
verified against the downloaded files when pinned)."""


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


def render_setup(python: str) -> str:
    """The set-up script: pinned, checksummed uv, then Python ``python`` behind
    :data:`REMOTE_PYTHON`; it prints the host key again when done."""
    (x86_url, x86_sum), (arm_url, arm_sum) = UV_WHEELS["x86_64"], UV_WHEELS["aarch64"]
    return template("setup.sh").format(
        python=python, wrapper=REMOTE_PYTHON, state=STATE_DIR, uv_version=UV_VERSION,
        uv_x86_64_url=x86_url, uv_x86_64_sha256=x86_sum,
        uv_aarch64_url=arm_url, uv_aarch64_sha256=arm_sum,
    )  # fmt: skip


def render_user_data(
    python: str, idle_shutdown_minutes: float, max_lifetime_hours: float, user: str
) -> str:
    """The instance's cloud-init user data (``#cloud-config`` in JSON, a subset of YAML).

    In cloud-init's earliest step (``bootcmd``), before anything that can fail: the hard
    lifetime (power off after ``max_lifetime_hours`` whatever happens), then the dead-man
    switch (power off after ``idle_shutdown_minutes`` without a logged-in ``user``).
    cloud-init then generates the instance's own ed25519 host key; the set-up prints it
    on the console and installs uv and Python ``python`` behind :data:`REMOTE_PYTHON`.
    An instance that powers itself off terminates (its shutdown behaviour).
    """
    lifetime = max(60, round(max_lifetime_hours * 3600))
    idle = max(60, round(idle_shutdown_minutes * 60))
    # systemd-run talks to systemd over its private socket, up before D-Bus and logind.
    arm_lifetime = (
        f"systemd-run --unit=skyward-lifetime --on-active={lifetime}s "
        f"--timer-property=AccuracySec=1s systemctl poweroff || shutdown -P +{lifetime // 60}"
    )
    # The script travels as an argument ($1), not in the service's command line, which
    # systemd would expand ($VAR, %x).
    install = (
        f'mkdir -p /usr/local/sbin && printf "%s" "$1" > {DEADMAN} && chmod 0755 {DEADMAN} && '
        f'systemd-run --unit=skyward-deadman --property=Restart=always {DEADMAN} "$2" "$3"'
    )
    arm_deadman = ["sh", "-c", install, "skyward-deadman", template("deadman.sh"), str(idle), user]
    config: dict[str, Any] = {
        "bootcmd": [arm_lifetime, arm_deadman],
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],
        "disable_root": True,
        "write_files": [
            {"path": "/etc/ssh/sshd_config.d/00-skyward.conf", "permissions": "0644",
             "content": template("sshd.conf")},
            {"path": "/usr/local/sbin/skyward-hostkey", "permissions": "0755",
             "content": template("hostkey.sh").format(mark=HOST_KEY_MARK)},
            {"path": "/usr/local/sbin/skyward-setup", "permissions": "0755",
             "content": render_setup(python)},
            {"path": REMOTE_PYTHON, "permissions": "0755", "content": render_wrapper()},
        ],
        "runcmd": [
            ["/usr/local/sbin/skyward-hostkey"],
            ["/usr/local/sbin/skyward-setup"],
        ],
    }  # fmt: skip
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"
