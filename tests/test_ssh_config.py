"""sky.SSH reads an OpenSSH client configuration as ``ssh`` does: aliases, HostName, User,
Port, IdentityFile, ProxyJump through a bastion (a second loopback sshd), host keys
checked at every hop, and explicit arguments winning over the file.

Every test passes its own ``ssh_config=``; the real user's ``~/.ssh/config`` is never
read (see conftest).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from sshd_hosts import SSHDCluster, SSHDHost

import skyward as sky
from skyward.errors import HostKeyError
from skyward.providers.ssh_config import Host, load, resolve

pytestmark = pytest.mark.timeout(120)

PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


# --- resolution (no network) -----------------------------------------------------------------


def test_alias_takes_hostname_user_port_and_identity_file_with_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(
        write_config(
            tmp_path,
            "Host gpu-box\n  HostName 10.1.2.3\n  User alice\n  Port 2200\n"
            "  IdentityFile ~/.ssh/id_gpu\n  IdentitiesOnly yes\n"
            "Host *\n  User fallback\n",
        )
    )
    host = resolve("gpu-box", config)
    assert host == Host(
        "10.1.2.3",
        2200,
        "alice",
        alias="gpu-box",
        identity_files=(str(tmp_path / "home" / ".ssh" / "id_gpu"),),
        identities_only=True,
    )
    assert host.label == "gpu-box"
    # A name without a block gets the 'Host *' values and keeps today's label.
    assert resolve("10.9.9.9:2022", config) == Host("10.9.9.9", 2022, "fallback")
    assert resolve("10.9.9.9:2022", config).label == "10.9.9.9:2022"


def test_explicit_values_win_over_the_config_like_ssh_command_line(tmp_path: Path) -> None:
    config = load(write_config(tmp_path, "Host gpu-box\n  HostName h\n  User alice\n  Port 2200\n"))
    given = resolve("bob@gpu-box:2300", config, user="carol", port=2400)
    assert (given.hostname, given.port, given.username) == ("h", 2300, "bob")
    explicit = resolve("gpu-box", config, user="carol", port=2400)
    assert (explicit.hostname, explicit.port, explicit.username) == ("h", 2400, "carol")
    # sky.SSH(user=, port=) the same way; key_filename replaces IdentityFile (see launch).
    provider = sky.SSH(
        ["gpu-box"], user="carol", port=2400, ssh_config=str(tmp_path / "ssh_config")
    )
    assert provider.resolved[0].port == 2400 and provider.resolved[0].username == "carol"


def test_proxyjump_chains_are_flattened_in_connection_order(tmp_path: Path) -> None:
    config = load(
        write_config(
            tmp_path,
            "Host target\n  HostName 10.0.0.9\n  ProxyJump j1,bob@j2:2202\n"
            "Host j1\n  HostName 192.0.2.1\n  User ops\n  ProxyJump outer\n"
            "Host j2\n  HostName 192.0.2.2\n  ProxyJump ignored-for-a-later-hop\n"
            "Host outer\n  HostName 192.0.2.100\n  Port 2100\n",
        )
    )
    hops = resolve("target", config).jumps
    assert [(h.hostname, h.port, h.username) for h in hops] == [
        ("192.0.2.100", 2100, None),
        ("192.0.2.1", 22, "ops"),
        ("192.0.2.2", 2202, "bob"),
    ]
    assert all(h.jumps == () for h in hops)
    none = load(write_config(tmp_path, "Host a\n  ProxyJump none\nHost *\n  ProxyJump a\n"))
    assert resolve("a", none).jumps == ()


def test_bad_configs_are_clear_errors(tmp_path: Path) -> None:
    loop = load(write_config(tmp_path, "Host *\n  ProxyJump hop\n"))
    with pytest.raises(ValueError, match="loops.*ProxyJump none"):
        resolve("x", loop)
    command = load(write_config(tmp_path, "Host x\n  ProxyCommand nc %h %p\n"))
    with pytest.raises(ValueError, match="ProxyCommand.*use ProxyJump"):
        resolve("x", command)
    with pytest.raises(ValueError, match="does not exist"):
        sky.SSH(["x"], ssh_config=str(tmp_path / "missing"))
    assert load("none") is None
    assert load(None) is None  # the default path: absent in the tests (conftest)


# --- through a bastion -----------------------------------------------------------------------


@pytest.fixture
def jump_config(ssh_clean: SSHDCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An ssh config where ``gpu-box`` is hosts[1], reached through ``bastion`` (hosts[0]),
    both with the key ``~/.ssh/id_test`` of a temporary home."""
    cluster, home = ssh_clean, tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    bastion, target = cluster.hosts[0], cluster.hosts[1]
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(cluster.key_filename, home / ".ssh" / "id_test")
    (home / ".ssh" / "id_test").chmod(0o600)
    return write_config(
        tmp_path,
        f"Host gpu-box\n  HostName {target.address}\n  Port {target.port}\n"
        f"  User {cluster.user}\n  IdentityFile ~/.ssh/id_test\n  ProxyJump bastion\n"
        f"Host bastion\n  HostName {bastion.address}\n  Port {bastion.port}\n"
        f"  User {cluster.user}\n  IdentityFile ~/.ssh/id_test\n",
    )


def forwarded_to(bastion: SSHDHost, target: SSHDHost) -> bool:
    """Whether a session of the bastion's sshd holds a TCP connection to ``target``."""
    for proc in bastion.sessions():
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(
            c.raddr and (c.raddr.ip, c.raddr.port) == (target.address, target.port) for c in conns
        ):
            return True
    return False


def client_connections_to(target: SSHDHost) -> list[object]:
    return [
        c
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and (c.raddr.ip, c.raddr.port) == (target.address, target.port)
    ]


def where() -> str:
    import os

    return os.environ.get("SSH_CONNECTION", "")


def test_alias_with_proxyjump_runs_tasks_through_the_bastion_and_closes_both(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str, jump_config: str
) -> None:
    bastion, target = ssh_clean.hosts[0], ssh_clean.hosts[1]
    provider = sky.SSH(
        ["gpu-box"],
        ssh_config=jump_config,
        known_hosts=ssh_clean.known_hosts,
        python=sys.executable,
        env_root=ssh_env_root,
    )
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    with sky.Compute(provider, nodes=1, worker=sky.Worker(2), image=image) as compute:
        assert [node.name for node in compute.nodes] == ["gpu-box"]
        assert list(compute.map(abs, [-1, -2, -3])) == [1, 2, 3]
        connection = compute.submit(where).result(timeout=60).split()
        # The agent's sshd is the target's, entered from the bastion, not from this client.
        assert connection[2:] == [target.address, str(target.port)]
        assert forwarded_to(bastion, target)
        assert client_connections_to(target) == []
    # ssh_clean then checks that no sshd session is left on either daemon: the jump
    # transport was closed with the node.
    assert wait_until(lambda: not bastion.sessions(), 5.0)


def test_unknown_host_key_at_the_jump_host_is_refused(
    ssh_clean: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str, jump_config: str, tmp_path: Path
) -> None:
    config = jump_config
    bastion, target = ssh_clean.hosts[0], ssh_clean.hosts[1]
    image = sky.Image(wheelhouse=ssh_wheelhouse)

    def start(trusted: list[SSHDHost]) -> str:
        known = tmp_path / "known_hosts"
        known.write_text("".join(h.known_hosts_line for h in trusted))
        provider = sky.SSH(["gpu-box"], ssh_config=config, known_hosts=str(known),
                           python=sys.executable, env_root=ssh_env_root)  # fmt: skip
        with pytest.raises(HostKeyError) as info:
            with sky.Compute(provider, nodes=1, image=image):
                pytest.fail("an unknown host key must not connect")
        return str(info.value)

    message = start([target])  # the bastion is not trusted
    assert message.startswith(
        f"bastion (jump host of gpu-box): host key not trusted: [{bastion.address}]:{bastion.port}"
    )
    assert bastion.host_key().fingerprint in message
    assert not forwarded_to(bastion, target)
    message = start([bastion])  # the bastion is trusted, the target behind it is not
    assert message.startswith(f"gpu-box: host key not trusted: [{target.address}]:{target.port}")
    assert target.host_key().fingerprint in message


def test_doctor_checks_an_alias_through_its_jump_host(
    ssh_clean: SSHDCluster, ssh_env_root: str, jump_config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from skyward.__main__ import main

    args = [
        "--ssh-config", jump_config, "--known-hosts", ssh_clean.known_hosts,
        "--python", sys.executable, "--env-root", ssh_env_root, "--min-free-gb", "0.001",
    ]  # fmt: skip
    assert main(["doctor", "ssh", "gpu-box", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].strip() for line in out[:-1]] == [
        "host key", "login", "python", "installer", "disk",
    ], out  # fmt: skip
    assert all(line.startswith("ok   gpu-box: ") for line in out[:-1])
    assert wait_until(lambda: not ssh_clean.sessions(), 5.0)
