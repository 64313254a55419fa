"""Host keys: unknown and changed keys are refused with the fix in the message; known keys
connect; pinned keys (as the AWS provider uses) accept only themselves."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import paramiko
import pytest
from sshd_hosts import SSHDCluster, write_keypair

import skyward as sky
from skyward.errors import HostKeyError, NodeStartError
from skyward.providers.ssh import HostLauncher

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def image(ssh_wheelhouse: str) -> sky.Image:
    return sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)


def provider(cluster: SSHDCluster, known_hosts: str, env_root: str) -> sky.SSH:
    return sky.SSH(
        cluster.specs(),
        key_filename=cluster.key_filename,
        known_hosts=known_hosts,
        python=sys.executable,
        env_root=env_root,
    )


def stranger_key(tmp_path: Path) -> paramiko.PKey:
    write_keypair(tmp_path / "other_key")
    return paramiko.Ed25519Key(filename=str(tmp_path / "other_key"))


def test_unknown_host_key_is_refused_with_fingerprint_and_fix(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    host = ssh_clean.hosts[0]
    with pytest.raises(HostKeyError) as info:
        with sky.Compute(provider(ssh_clean, str(empty), ssh_env_root), nodes=3, image=image):
            pytest.fail("an unknown host key must not connect")
    message = str(info.value)
    assert message.startswith(f"{host.address}:{host.port}: host key not trusted")
    assert host.host_key().fingerprint in message
    assert f"ssh-keyscan -p {host.port} {host.address}" in message
    assert str(empty) in message


def test_changed_host_key_is_refused(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    host = ssh_clean.hosts[1]
    old = stranger_key(tmp_path)
    known = tmp_path / "known_hosts"
    lines = Path(ssh_clean.known_hosts).read_text().splitlines()
    lines[1] = f"[{host.address}]:{host.port} {old.get_name()} {old.get_base64()}"
    known.write_text("\n".join(lines) + "\n")
    with pytest.raises(HostKeyError) as info:
        with sky.Compute(provider(ssh_clean, str(known), ssh_env_root), nodes=3, image=image):
            pytest.fail("a changed host key must not connect")
    message = str(info.value)
    assert message.startswith(f"{host.address}:{host.port}: host key CHANGED")
    assert old.fingerprint in message and host.host_key().fingerprint in message
    assert "ssh-keygen -R" in message


def test_known_host_keys_connect(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image
) -> None:
    with sky.Compute(
        provider(ssh_clean, ssh_clean.known_hosts, ssh_env_root), nodes=3, image=image
    ) as compute:
        assert sum(compute.map(int, ["1", "2", "3"])) == 6
        assert all(node.alive for node in compute.nodes)


def launcher(
    cluster: SSHDCluster, keys: paramiko.HostKeys, env_root: str, image: sky.Image
) -> HostLauncher:
    host = cluster.hosts[2]
    return HostLauncher(
        "pinned",
        host.address,
        host.port,
        cluster.user,
        image=image,
        key_filename=cluster.key_filename,
        host_keys=keys,
        python=sys.executable,
        env_root=env_root,
    )


def test_pinned_host_key_accepts_only_itself(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    host = ssh_clean.hosts[2]
    right = paramiko.HostKeys()
    right.add(host.address, "ssh-ed25519", host.host_key())  # bare address: any port
    node = launcher(ssh_clean, right, ssh_env_root, image)
    try:
        channel = node.open()
        assert channel.pid is not None
        channel.close()
    finally:
        node.close()
    node.close()  # idempotent

    wrong = paramiko.HostKeys()
    wrong.add(f"[{host.address}]:{host.port}", "ssh-ed25519", stranger_key(tmp_path))
    # The session known_hosts would trust the host; pinned keys replace it entirely.
    node = launcher(ssh_clean, wrong, ssh_env_root, image)
    node.known_hosts = ssh_clean.known_hosts
    with pytest.raises(HostKeyError, match="CHANGED.*pin its new key"):
        node.open()
    node.close()


def test_key_and_known_hosts_paths_starting_with_tilde_are_expanded(
    ssh_clean: SSHDCluster,
    ssh_env_root: str,
    image: sky.Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``SSH(key_filename="~/.ssh/id_ed25519")`` as docs/ssh.md writes it."""
    ssh_dir = tmp_path / "home" / ".ssh"
    ssh_dir.mkdir(parents=True)
    shutil.copy(ssh_clean.key_filename, ssh_dir / "id_test")
    (ssh_dir / "id_test").chmod(0o600)
    shutil.copy(ssh_clean.known_hosts, ssh_dir / "known_hosts_test")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tilde = sky.SSH(
        ssh_clean.specs(),
        key_filename="~/.ssh/id_test",
        known_hosts="~/.ssh/known_hosts_test",
        python=sys.executable,
        env_root=ssh_env_root,
    )
    with sky.Compute(tilde, nodes=1, image=image) as compute:
        assert compute.submit(abs, -3).result(timeout=60) == 3
    missing = sky.SSH(
        ssh_clean.specs(), key_filename="~/.ssh/id_missing", known_hosts="~/.ssh/known_hosts_test"
    )
    expected = str(ssh_dir / "id_missing")
    with pytest.raises(NodeStartError) as info:
        with sky.Compute(missing, nodes=1, image=image):
            pytest.fail("a missing key file must not connect")
    assert f"key file {expected} does not exist" in str(info.value)


# --- known_hosts as OpenSSH reads it: the system file, @revoked, @cert-authority --------------


def one_host(cluster: SSHDCluster, known_hosts: Path, env_root: str, **options: object) -> sky.SSH:
    return sky.SSH(
        cluster.specs()[:1],
        key_filename=cluster.key_filename,
        known_hosts=str(known_hosts),
        python=sys.executable,
        env_root=env_root,
        **options,  # type: ignore[arg-type]
    )


def public_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


@pytest.mark.parametrize("pattern", ["*", "[127.0.0.*]:*", "[{address}]:{port}"])
def test_revoked_host_key_is_refused_even_where_a_line_trusts_it(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path, pattern: str
) -> None:
    host = ssh_clean.hosts[0]
    known = tmp_path / "known_hosts"
    revoked = pattern.format(address=host.address, port=host.port)
    known.write_text(
        Path(ssh_clean.known_hosts).read_text()
        + f"@revoked {revoked} {public_line(host.host_key())}\n"
    )
    with pytest.raises(HostKeyError) as info:
        with sky.Compute(one_host(ssh_clean, known, ssh_env_root), nodes=1, image=image):
            pytest.fail("a revoked host key must not connect")
    message = str(info.value)
    assert "host key REVOKED" in message and host.host_key().fingerprint in message
    assert f"{known} line 4 marks @revoked" in message


def test_revoked_key_of_another_host_does_not_matter(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    host, other = ssh_clean.hosts[0], ssh_clean.hosts[1]
    known = tmp_path / "known_hosts"
    known.write_text(
        Path(ssh_clean.known_hosts).read_text()
        + f"@revoked [{other.address}]:{other.port} {public_line(host.host_key())}\n"
    )
    with sky.Compute(one_host(ssh_clean, known, ssh_env_root), nodes=1, image=image) as compute:
        assert compute.submit(abs, -2).result(timeout=60) == 2


def test_system_known_hosts_file_is_read_too(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    """As ssh does: trusted in the system-wide file only is trusted."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    system = tmp_path / "ssh_known_hosts"
    shutil.copy(ssh_clean.known_hosts, system)
    trusting = one_host(ssh_clean, empty, ssh_env_root, system_known_hosts=str(system))
    with sky.Compute(trusting, nodes=1, image=image) as compute:
        assert compute.submit(abs, -2).result(timeout=60) == 2
    without = one_host(ssh_clean, empty, ssh_env_root, system_known_hosts=None)
    with pytest.raises(HostKeyError, match="host key not trusted"):
        with sky.Compute(without, nodes=1, image=image):
            pytest.fail("without the system file the host is unknown")


def test_cert_authority_line_trusts_nothing_and_the_error_says_so(
    ssh_clean: SSHDCluster, ssh_env_root: str, image: sky.Image, tmp_path: Path
) -> None:
    host = ssh_clean.hosts[0]
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority [127.0.0.*]:* {public_line(stranger_key(tmp_path))}\n")
    with pytest.raises(HostKeyError) as info:
        with sky.Compute(
            one_host(ssh_clean, known, ssh_env_root, system_known_hosts=None), nodes=1, image=image
        ):
            pytest.fail("a host covered only by a @cert-authority line must not connect")
    message = str(info.value)
    assert "host key not trusted" in message and host.host_key().fingerprint in message
    assert f"{known} line 1 trusts a certificate authority" in message
    assert "cannot check host certificates: trust the host's own key" in message


def test_host_patterns_match_like_openssh() -> None:
    from skyward.providers.known_hosts import host_matches

    hashed = paramiko.HostKeys.hash_host("[10.0.0.7]:2200")
    assert host_matches("gpu-1", ["gpu-1"]) and host_matches("GPU-1", ["gpu-1"])
    assert host_matches("[10.0.0.7]:2200", [hashed])
    assert not host_matches("[10.0.0.7]:22", [hashed])
    assert host_matches("gpu-12", ["gpu-?2"]) and host_matches("[gpu-1]:2200", ["[gpu-*]:2200"])
    assert not host_matches("gpu-1", ["gpu-*", "!gpu-1"])
    assert host_matches("gpu-2", ["gpu-*", "!gpu-1"])
    assert not host_matches("gpu-1", ["!gpu-1"])
    assert not host_matches("[gpu-1]:2200", ["gpu-1"])  # a port needs its own entry
