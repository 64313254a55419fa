"""The host side of the bootstrap run directly (no SSH): the ``python -m venv`` + pip path
for hosts without uv, what is shipped, and host string parsing; remote commands over a
loopback sshd."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from bootstrap_host import host_side, stage
from sshd_hosts import SSHDCluster

import skyward as sky
from skyward import bootstrap
from skyward.bootstrap import remote
from skyward.providers.ssh import Host


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
    # The agent carries nothing of the client: none of the client's dependencies is installed.
    absent = (
        "import importlib.util as u; print([m for m in ('pluggy', 'paramiko') if u.find_spec(m)])"
    )
    out = subprocess.run([python, "-c", absent], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
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


def test_only_the_standard_library_host_script_is_shipped(tmp_path: Path) -> None:
    """The command carries ``bootstrap/host.py`` and nothing else, and it runs on an
    interpreter that has no site-packages at all (no skyward, no paramiko)."""
    import ast
    import base64
    import zlib

    from skyward.bootstrap import host

    line = remote.remote_command(sys.executable, "probe")
    payload = shlex.split(line)[3]
    shipped = zlib.decompress(base64.b64decode(payload))
    assert shipped == Path(host.__file__).read_bytes()
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(shipped))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert {name.split(".")[0] for name in imported} <= set(sys.stdlib_module_names) | {
        "__future__"
    }
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S "$@"\n')
    bare.chmod(0o755)
    args = {"env_root": str(tmp_path / "envs"), "digest": "d", "install_key": "k", "code": "c"}
    probe = host_side("probe", args, python=str(bare))
    assert probe["ready"] is False and probe["env"] == str(tmp_path / "envs" / "d")


@pytest.fixture
def ssh_client(ssh_clean: SSHDCluster) -> Iterator[paramiko.SSHClient]:
    """A paramiko connection to the first loopback host."""
    host = ssh_clean.hosts[0]
    client = paramiko.SSHClient()
    client.load_host_keys(ssh_clean.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host.address, host.port, ssh_clean.user, key_filename=ssh_clean.key_filename,
                   look_for_keys=False, allow_agent=False, timeout=30)  # fmt: skip
    try:
        yield client
    finally:
        client.close()


def test_run_remote_returns_both_streams_whole_and_lines_as_they_come(
    ssh_client: paramiko.SSHClient,
) -> None:
    """More than a channel window on stdout and on stderr at once: neither stream stalls."""
    script = (
        "import sys\n"
        "for i in range(3000): print(f'line {i} ' + 'x' * 100); sys.stderr.write('e' * 100)\n"
        "sys.exit(3)"
    )
    lines: list[str] = []
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    code, out, err = remote.run_remote(ssh_client, command, 60, lines.append)
    assert code == 3
    assert out.splitlines() == lines == [f"line {i} " + "x" * 100 for i in range(3000)]
    assert err == "e" * 300_000


def test_run_remote_gives_up_at_its_timeout(ssh_client: paramiko.SSHClient) -> None:
    """A command that never answers (it waits for input that never comes): TimeoutError."""
    with pytest.raises(TimeoutError, match="no answer within"):
        remote.run_remote(ssh_client, "read line", 0.5)
