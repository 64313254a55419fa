"""The host side of the bootstrap run directly (no SSH): the ``python -m venv`` + pip path
for hosts without uv, and host string parsing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import skyward as sky
from skyward import bootstrap
from skyward.providers.ssh import Host


def host_side(command: str, args: dict[str, object]) -> dict[str, object]:
    """Run the bootstrap's host-side ``command`` here, as the SSH provider runs it there."""
    line = bootstrap.remote_command(sys.executable, command, args)
    proc = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=600)
    return bootstrap._parse(command, proc.returncode, proc.stdout, proc.stderr)


def stage(plan: bootstrap.Plan, base: dict[str, object], wheelhouse: str) -> dict[str, object]:
    """Probe, then place the files as the SFTP upload does; return the prepare arguments."""
    probe = host_side("probe", base)
    assert probe["ready"] is False
    wheels = bootstrap.ClientWheels.shared().paths
    for wheel in Path(wheelhouse).iterdir():
        shutil.copy(wheel, Path(str(probe["wheelhouse"])) / wheel.name)
    for wheel in wheels:
        shutil.copy(wheel, Path(str(probe["wheels"])) / wheel.name)
    return {
        **base,
        "packages": list(plan.packages),
        "offline": True,
        "env": {},
        "wheels": [p.name for p in wheels],
    }


@pytest.mark.timeout(600)
def test_venv_and_pip_when_the_host_has_no_uv(tmp_path: Path, ssh_wheelhouse: str) -> None:
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    plan = bootstrap.Plan.of(image)
    base = plan.args(str(tmp_path / "envs"))
    args = stage(plan, base, ssh_wheelhouse)
    args["uv"] = False
    done = host_side("prepare", args)
    assert done["steps"] == ["create venv", "install packages", "install skyward"]
    python = str(done["python"])
    assert (Path(python).parent / "pip").exists()  # made by venv + pip, not uv
    check = "import skyward.agent, threadpoolctl, cloudpickle; print(threadpoolctl.__file__)"
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(str(tmp_path / "envs")), out.stderr
    assert host_side("probe", base)["ready"] is True
    assert host_side("prepare", args)["steps"] == []  # already complete: nothing redone
    # The agent command's own readiness check agrees (it execs the agent when ready).
    ready = bootstrap.agent_command(plan, str(tmp_path / "envs"))
    proc = subprocess.run(ready, shell=True, capture_output=True, timeout=60, input=b"")
    assert proc.returncode == 0 and b"skyward-agent-pid" in proc.stderr, proc.stderr
    missing = bootstrap.agent_command(plan, str(tmp_path / "elsewhere"))
    proc = subprocess.run(missing, shell=True, capture_output=True, timeout=60, input=b"")
    assert proc.returncode == bootstrap.NOT_READY and proc.stderr == b""


def test_failed_install_names_the_step(tmp_path: Path, ssh_wheelhouse: str) -> None:
    image = sky.Image(pip=["package-that-is-not-in-the-wheelhouse"], wheelhouse=ssh_wheelhouse)
    plan = bootstrap.Plan.of(image)
    args = stage(plan, plan.args(str(tmp_path / "envs")), ssh_wheelhouse)
    with pytest.raises(bootstrap.BootstrapError, match="package-that-is-not") as info:
        host_side("prepare", args)
    assert info.value.step == "install packages"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu-1", Host("gpu-1", 22, "me")),
        ("alice@gpu-1", Host("gpu-1", 22, "alice")),
        ("gpu-1:2200", Host("gpu-1", 2200, "me")),
        ("bob@10.0.0.7:2222", Host("10.0.0.7", 2222, "bob")),
        ("[::1]:2022", Host("::1", 2022, "me")),
        ("carol@[fe80::1]", Host("fe80::1", 22, "carol")),
    ],
)
def test_host_strings(text: str, expected: Host) -> None:
    assert Host.parse(text, "me", 22) == expected


@pytest.mark.parametrize("text", ["", "a@b@c", "host:port", "[::1"])
def test_bad_host_strings(text: str) -> None:
    with pytest.raises(ValueError, match="invalid SSH host"):
        Host.parse(text, None, 22)


def test_provider_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="list of hosts"):
        sky.SSH("gpu-1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        sky.SSH([])
    assert json.dumps(sky.SSH(["a", "b:2"]).hosts) == '["a", "b:2"]'
