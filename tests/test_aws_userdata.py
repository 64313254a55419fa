"""The instances' user data: what it arms first, what it installs, that it carries no key;
and its shell scripts run for real (the dead-man switch with a fake clock, the uv
download check, the host key line, the interpreter wrapper). Nothing is downloaded."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sshd_daemons import write_keypair

from skyward.providers import ClusterSpec
from skyward.providers.aws.keys import console_host_keys
from skyward.providers.aws.userdata import (
    SETUP_PENDING,
    STATE_DIR,
    UV_VERSION,
    UV_WHEELS,
    render_user_data,
    render_wrapper,
)
from skyward.spec import Image, Worker

if TYPE_CHECKING:
    from moto_ec2 import Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)


def config_of(text: str) -> dict[str, Any]:
    header, body = text.split("\n", 1)
    assert header == "#cloud-config"
    config: dict[str, Any] = json.loads(body)
    return config


def files_of(config: dict[str, Any]) -> dict[str, str]:
    return {f["path"]: f["content"] for f in config["write_files"]}


def rendered(**options: Any) -> dict[str, Any]:
    args = {"python": "3.11", "idle_shutdown_minutes": 15, "max_lifetime_hours": 12,
            "user": "ec2-user", **options}  # fmt: skip
    return config_of(render_user_data(**args))


def test_user_data_arms_the_lifetime_first_then_the_dead_man_switch(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    """Read back from the instance: the provider's options reach its user data."""
    cluster = ClusterSpec(1, Worker(), Image(), f"u{os.getpid():x}")
    aws = aws_provider(idle_shutdown_minutes=7, max_lifetime_hours=2.5, user="ubuntu")
    with ExitStack() as stack:
        aws.launch(cluster, stack)
        (instance,) = moto.live_instances(cluster.cluster_id)
        raw = moto.ec2.describe_instance_attribute(
            InstanceId=instance["InstanceId"], Attribute="userData"
        )["UserData"]["Value"]
    config = config_of(base64.b64decode(raw).decode())
    # bootcmd is cloud-init's earliest step; the lifetime is its first command.
    assert next(iter(config)) == "bootcmd"
    lifetime, deadman = config["bootcmd"]
    assert lifetime.startswith("systemd-run --unit=skyward-lifetime --on-active=9000s ")
    assert "systemctl poweroff || shutdown -P +150" in lifetime
    assert deadman[:2] == ["sh", "-c"] and deadman[-2:] == ["420", "ubuntu"]
    assert "systemd-run --unit=skyward-deadman --property=Restart=always" in deadman[2]
    assert "systemctl poweroff" in deadman[4]
    assert config["runcmd"][-1] == ["/usr/local/sbin/skyward-setup"]


def test_default_lifetime_is_12_hours(aws_provider: Callable[..., Any]) -> None:
    assert aws_provider().max_lifetime_hours == 12
    assert "--on-active=43200s" in rendered()["bootcmd"][0]
    with pytest.raises(ValueError, match="max_lifetime_hours=0"):
        aws_provider(max_lifetime_hours=0)


def test_user_data_carries_no_host_key_each_instance_makes_its_own() -> None:
    config = rendered()
    text = json.dumps(config)
    assert "ssh_keys" not in config and "PRIVATE KEY" not in text
    assert config["ssh_deletekeys"] is True and config["ssh_genkeytypes"] == ["ed25519"]
    # Printed on the console first thing in the final stage, and again after the set-up.
    assert config["runcmd"][0] == ["/usr/local/sbin/skyward-hostkey"]
    assert files_of(config)["/usr/local/sbin/skyward-setup"].rstrip().endswith(
        "/usr/local/sbin/skyward-hostkey"
    )


def test_host_key_script_prints_a_line_the_client_reads(tmp_path: Path) -> None:
    """Run the real script on a key file, writing to a file instead of /dev/console."""
    pub = tmp_path / "ssh_host_ed25519_key.pub"
    pub.write_text(write_keypair(tmp_path / "ssh_host_ed25519_key") + " root@ip-10-0-0-1\n")
    script = files_of(rendered())["/usr/local/sbin/skyward-hostkey"]
    console = tmp_path / "console"
    script = script.replace("/etc/ssh/ssh_host_ed25519_key.pub", str(pub))
    script = script.replace("/dev/console", str(console))
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    noise = "[   12.3] cloud-init[812]: some boot log\r\n"
    (key,) = console_host_keys(noise + console.read_text().replace("\n", "\r\n") + noise)
    assert f"{key.get_name()} {key.get_base64()}" == " ".join(pub.read_text().split()[:2])


def test_console_lines_other_than_exact_host_key_lines_are_ignored() -> None:
    one = "AAAAC3NzaC1lZDI1NTE5AAAAIJDW6O7m5D07o+OX28hs4r4+UFNhrU9mmY1q9sQ1hf1G"
    assert console_host_keys(f"echo SKYWARD-HOST-KEY ssh-ed25519 {one}\n") == []
    assert console_host_keys(f"SKYWARD-HOST-KEY ssh-rsa {one}\n") == []
    assert console_host_keys(f"SKYWARD-HOST-KEY ssh-ed25519 {one[:-5]}\n") == []  # cut short
    assert len(console_host_keys(f"SKYWARD-HOST-KEY ssh-ed25519 {one}\n" * 2)) == 1


def test_sshd_drop_in_is_named_to_be_read_first() -> None:
    """sshd keeps the first value it reads; drop-ins are read in name order."""
    files = files_of(rendered())
    (drop_in,) = [path for path in files if path.startswith("/etc/ssh/sshd_config.d/")]
    assert drop_in == "/etc/ssh/sshd_config.d/00-skyward.conf"
    assert "PasswordAuthentication no" in files[drop_in]


def test_uv_is_a_pinned_wheel_checked_before_it_runs() -> None:
    setup = files_of(rendered(python="3.12"))["/usr/local/sbin/skyward-setup"]
    assert "astral.sh" not in setup and not re.search(r"\|\s*(ba)?sh\b", setup)
    assert "set -eu" in setup.splitlines()  # a failed check stops the script
    for arch, (url, sha256) in UV_WHEELS.items():
        assert url.startswith("https://files.pythonhosted.org/packages/")
        assert f"/uv-{UV_VERSION}-py3-none-manylinux" in url and arch in url
        assert f"url={url}; sha256={sha256}" in setup and len(sha256) == 64
    check = setup.index('sha256sum -c -')
    assert check < setup.index("install -m 0755") < setup.index("uv python install 3.12")


def fake_uv_wheel(path: Path) -> None:
    """A wheel-shaped zip holding a uv that records what it was asked."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"uv-{UV_VERSION}.data/scripts/uv", '#!/bin/sh\necho "$@" >> "$UV_LOG"\n')


def run_setup(tmp_path: Path, served: Path, pinned_sha256: str) -> subprocess.CompletedProcess[str]:
    """The real set-up script, its system paths moved under ``tmp_path``, with a ``curl``
    that serves ``served`` and the pinned hash replaced by ``pinned_sha256``."""
    setup = files_of(rendered())["/usr/local/sbin/skyward-setup"]
    for _, sha256 in UV_WHEELS.values():
        setup = setup.replace(sha256, pinned_sha256)
    for path, moved in [
        (STATE_DIR, tmp_path / "state"), ("/usr/local/bin/uv", tmp_path / "uv"),
        ("/opt/skyward", tmp_path / "opt"), ("/usr/local/sbin/skyward-hostkey", "true"),
    ]:  # fmt: skip
        setup = setup.replace(path, str(moved))
    (tmp_path / "opt").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(f'#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\ncp {served} "$2"\n')
    curl.chmod(0o755)
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "UV_LOG": str(tmp_path / "log")}
    return subprocess.run(["sh", "-c", setup], env=env, capture_output=True, text=True, timeout=60)


def test_a_uv_download_that_does_not_match_its_hash_is_never_run(tmp_path: Path) -> None:
    served = tmp_path / "uv.whl"
    fake_uv_wheel(served)
    result = run_setup(tmp_path, served, pinned_sha256="0" * 64)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
    assert not (tmp_path / "uv").exists() and not (tmp_path / "log").exists()
    assert (tmp_path / "state" / "failed").exists()


def test_the_pinned_uv_download_is_installed_and_runs(tmp_path: Path) -> None:
    served = tmp_path / "uv.whl"
    fake_uv_wheel(served)
    result = run_setup(tmp_path, served, hashlib.sha256(served.read_bytes()).hexdigest())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "uv").stat().st_mode & 0o777 == 0o755
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls == ["python install 3.11", "python find 3.11"]
    assert (tmp_path / "state" / "ready").exists()


def _fake_bin(folder: Path, tools: dict[str, str]) -> str:
    folder.mkdir()
    for name, body in tools.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return f"{folder}:{os.environ['PATH']}"


def run_dead_man(tmp_path: Path, logged_in_for: int, ss: str = "exit 0") -> tuple[int, list[str]]:
    """Run the real dead-man script (idle 60 s, user ec2-user) with a fake clock: each
    `date` call advances 10 s. The login user has processes for the first
    ``logged_in_for`` checks. Returns the clock at power-off and pgrep's arguments."""
    config = rendered(idle_shutdown_minutes=1)
    script = tmp_path / "deadman"
    script.write_text(config["bootcmd"][1][4])
    clock, checks, log = tmp_path / "clock", tmp_path / "checks", tmp_path / "log"
    clock.write_text("0")
    checks.write_text("0")
    path = _fake_bin(
        tmp_path / "bin",
        {
            "date": f'n=$(cat {clock}); echo $((n + 10)) > {clock}; echo "$n"',
            "sleep": "exit 0",
            "pgrep": f'echo "$@" >> {tmp_path / "pgrep"}; n=$(cat {checks}); '
            f"echo $((n + 1)) > {checks}; [ $n -lt {logged_in_for} ]",
            "ss": ss,
            "logger": "exit 0",
            "systemctl": f'echo "$@ at $(cat {clock})" >> {log}',
        },
    )
    subprocess.run(
        ["sh", str(script), *config["bootcmd"][1][5:]],
        env={**os.environ, "PATH": path}, timeout=20, check=True,
    )  # fmt: skip
    ((action, at),) = [line.split(" at ") for line in log.read_text().splitlines()]
    assert action == "poweroff"
    return int(at), sorted(set((tmp_path / "pgrep").read_text().splitlines()))


@pytest.mark.parametrize("logged_in_for", [0, 3])
def test_dead_man_switch_powers_off_only_after_idle_time_without_a_login(
    tmp_path: Path, logged_in_for: int
) -> None:
    at, pgrep = run_dead_man(tmp_path, logged_in_for)
    # Last seen at the clock reading of check number `logged_in_for`; off >= 60 s later.
    assert at - 10 >= 10 * logged_in_for + 60
    assert pgrep == ["-u ec2-user"]


def test_dead_man_switch_ignores_connections_that_never_logged_in(tmp_path: Path) -> None:
    """Port-22 connections are established (a scanner) but nobody logged in: powers off."""
    established = "echo 'ESTAB 0 0 10.0.0.1:22 203.0.113.9:51234'"
    at, _ = run_dead_man(tmp_path, logged_in_for=0, ss=established)
    assert at - 10 >= 60


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
