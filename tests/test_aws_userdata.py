"""The instances' user data: what it installs and pins, and its shell scripts run for real
(the dead-man switch with a fake clock, the interpreter wrapper)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from skyward.providers import ClusterSpec
from skyward.providers.aws.keys import KeyPair
from skyward.providers.aws.userdata import SETUP_PENDING, render_user_data, render_wrapper
from skyward.spec import Image, Worker

if TYPE_CHECKING:
    from moto_ec2 import Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)


def test_user_data_pins_the_host_key_and_arms_the_dead_man_switch(
    moto: Moto, aws_provider: Callable[..., Any], tmp_path: Path
) -> None:
    host_key = tmp_path / "host_key"
    host_key.write_text(KeyPair.generate().private)
    cluster = ClusterSpec(1, Worker(), Image(), f"u{os.getpid():x}")
    with ExitStack() as stack:
        aws_provider(host_key=host_key, idle_shutdown_minutes=7).launch(cluster, stack)
        (instance,) = moto.live_instances(cluster.cluster_id)
        raw = moto.ec2.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="userData"
        )["UserData"]["Value"]
    text = base64.b64decode(raw).decode()
    header, body = text.split("\n", 1)
    assert header == "#cloud-config"
    config = json.loads(body)
    pinned = KeyPair.load(host_key)
    assert config["ssh_keys"] == {
        "ed25519_private": pinned.private,
        "ed25519_public": pinned.public,
    }
    assert config["ssh_deletekeys"] is True and config["ssh_genkeytypes"] == []
    files = {f["path"]: f["content"] for f in config["write_files"]}
    assert (
        "ExecStart=/usr/local/sbin/skyward-deadman 420\n"
        in files["/etc/systemd/system/skyward-deadman.service"]
    )
    assert "systemctl poweroff" in files["/usr/local/sbin/skyward-deadman"]
    assert "uv python install 3.11" in files["/usr/local/sbin/skyward-setup"].replace(
        Image().python, "3.11"
    )
    assert "PasswordAuthentication no" in files["/etc/ssh/sshd_config.d/60-skyward.conf"]
    # The switch is armed before the (slow, network-bound) Python installation.
    assert config["runcmd"].index(
        ["systemctl", "enable", "--now", "skyward-deadman.service"]
    ) < config["runcmd"].index(["/usr/local/sbin/skyward-setup"])


def test_user_data_installs_the_image_python_version() -> None:
    text = render_user_data(KeyPair.generate(), "3.12", 15)
    files = {f["path"]: f["content"] for f in json.loads(text.split("\n", 1)[1])["write_files"]}
    setup = files["/usr/local/sbin/skyward-setup"]
    assert "uv python install 3.12" in setup and "uv python find 3.12" in setup


def _fake_bin(folder: Path, tools: dict[str, str]) -> str:
    folder.mkdir()
    for name, body in tools.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("client_for", [0, 3])
def test_dead_man_script_powers_off_only_after_idle_time_without_a_client(
    tmp_path: Path, client_for: int
) -> None:
    """Run the real script with a fake clock: each `date` call advances 10 s."""
    script = tmp_path / "deadman"
    files = json.loads(render_user_data(KeyPair.generate(), "3.11", 1).split("\n", 1)[1])
    script.write_text(
        next(f["content"] for f in files["write_files"] if f["path"].endswith("deadman"))
    )
    clock, checks, log = tmp_path / "clock", tmp_path / "checks", tmp_path / "log"
    clock.write_text("0")
    checks.write_text("0")
    path = _fake_bin(
        tmp_path / "bin",
        {
            "date": f'n=$(cat {clock}); echo $((n + 10)) > {clock}; echo "$n"',
            "sleep": "exit 0",
            # An agent is running for the first `client_for` checks, then the client is gone.
            "pgrep": f"n=$(cat {checks}); echo $((n + 1)) > {checks}; [ $n -lt {client_for} ]",
            "ss": "exit 0",
            "logger": "exit 0",
            "systemctl": f'echo "$@ at $(cat {clock})" >> {log}',
        },
    )
    subprocess.run(
        ["sh", str(script), "60"], env={**os.environ, "PATH": path}, timeout=30, check=True
    )
    ((action, at),) = [line.split(" at ") for line in log.read_text().splitlines()]
    assert action == "poweroff"
    # Last seen at the clock reading of check number `client_for`; off >= 60 s later.
    last_seen = 10 * client_for
    assert int(at) - 10 >= last_seen + 60


def test_python_wrapper_waits_for_setup_then_runs_the_installed_python(tmp_path: Path) -> None:
    wrapper = tmp_path / "skyward-python"
    wrapper.write_text(render_wrapper(str(tmp_path), wait_seconds=1))
    wrapper.chmod(0o755)
    pending = subprocess.run(
        [str(wrapper), "-c", "print(1)"], capture_output=True, text=True, timeout=30
    )
    assert pending.returncode == 75 and SETUP_PENDING in pending.stderr
    (tmp_path / "python").write_text(sys.executable + "\n")
    (tmp_path / "ready").touch()
    ready = subprocess.run(
        [str(wrapper), "-c", "import sys; print(sys.executable)"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ready.returncode == 0 and ready.stdout.strip() == sys.executable
