"""Shared hosts: secrets never on a command line, a private ``env_root``, lock and marker
files that are not followed through symlinks, uploaded files trusted by hash."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import psutil
import pytest
from bootstrap_host import host_side, stage
from conftest import need, wait_until
from sshd_hosts import SSHDCluster

import skyward as sky
from skyward import bootstrap
from skyward.bootstrap import host
from skyward.bootstrap.environment import _uploads
from skyward.errors import BootstrapError, NodeStartError

pytestmark = pytest.mark.timeout(300)
PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


def env_var(name: str) -> str | None:
    """A variable of the task's environment (on the node)."""
    return os.environ.get(name)


def provider(cluster: SSHDCluster, env_root: Path) -> sky.SSH:
    return sky.SSH(
        cluster.specs()[:1],
        key_filename=cluster.key_filename,
        known_hosts=cluster.known_hosts,
        python=sys.executable,
        env_root=str(env_root),
    )


# --- secrets stay off command lines -----------------------------------------------------------


def slow_sdist(folder: Path, started: Path, release: Path) -> None:
    """An sdist whose in-tree build backend records the secret it sees in its environment,
    then blocks until ``release`` exists: the install is observed while it runs."""
    wheel_files = {
        "slowpkg/__init__.py": b"",
        "slowpkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: slowpkg\nVersion: 1.0\n",
        "slowpkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    backend = textwrap.dedent(
        f"""
        import base64, hashlib, os, time, zipfile

        def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
            with open({str(started)!r} + ".tmp", "w") as f:
                f.write(os.environ.get("SKYWARD_TEST_SECRET", ""))
            os.replace({str(started)!r} + ".tmp", {str(started)!r})
            deadline = time.monotonic() + 120
            while not os.path.exists({str(release)!r}) and time.monotonic() < deadline:
                time.sleep(0.02)
            name = "slowpkg-1.0-py3-none-any.whl"
            files = {wheel_files!r}
            record = []
            with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
                for path, data in files.items():
                    zf.writestr(path, data)
                    sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                    record.append(f"{{path}},sha256={{sha.decode()}},{{len(data)}}")
                record.append("slowpkg-1.0.dist-info/RECORD,,")
                zf.writestr("slowpkg-1.0.dist-info/RECORD", "\\n".join(record) + "\\n")
            return name
        """
    )
    pyproject = (
        '[build-system]\nrequires = []\nbuild-backend = "slow_backend"\nbackend-path = ["."]\n'
    )
    with tarfile.open(folder / "slowpkg-1.0.tar.gz", "w:gz") as tar:
        for name, text in {"pyproject.toml": pyproject, "slow_backend.py": backend}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"slowpkg-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def command_lines_with(text: str) -> list[str]:
    """Command lines of this machine's processes that contain ``text``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if text in line:
            found.append(f"{proc.pid}: {line[:300]}")
    return found


def test_image_env_is_on_no_command_line_while_a_cold_install_runs(
    ssh_clean: SSHDCluster, ssh_wheelhouse: str, tmp_path: Path
) -> None:
    secret = "tok-" + secrets.token_hex(16)
    wheelhouse = tmp_path / "wheelhouse"
    shutil.copytree(ssh_wheelhouse, wheelhouse)
    started, release = tmp_path / "build-started", tmp_path / "build-release"
    slow_sdist(wheelhouse, started, release)
    image = sky.Image(
        pip=["slowpkg"],
        env={"SKYWARD_TEST_SECRET": secret, "UV_INDEX_URL": f"https://u:{secret}@pypi.invalid/"},
        wheelhouse=str(wheelhouse),
    )
    seen: list[str] = []
    received: list[str] = []

    def scan() -> bool:
        seen.extend(command_lines_with(secret))
        return started.exists()

    def watch() -> None:
        try:
            # Every process of the install is checked until, and while, its build step
            # holds it (the prepare command itself runs throughout).
            if wait_until(scan, 120, 0.05):
                scan()
                received.append(started.read_text())
        finally:
            release.touch()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with sky.Compute(provider(ssh_clean, tmp_path / "envs"), nodes=1, image=image) as compute:
            assert compute.submit(env_var, "SKYWARD_TEST_SECRET").result() == secret
    finally:
        release.touch()
        watcher.join(10)
    # The installer did receive the secret (through its environment), and no command line
    # ever showed it.
    assert received == [secret]
    assert seen == []


# --- env_root must be private -----------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["writable by others", "writable by group", "owned by another user"]
)
def test_env_root_others_can_write_is_refused_before_anything_runs_from_it(
    ssh_clean: SSHDCluster, ssh_wheelhouse: str, tmp_path: Path, how: str
) -> None:
    """A complete-looking environment planted in ``env_root``: its interpreter never runs."""
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    plan = bootstrap.Plan.of(image)
    root = tmp_path / "envs"
    env = root / plan.digest
    (env / "bin").mkdir(parents=True)
    ran = tmp_path / "planted-python-ran"
    planted = env / "bin" / "python"
    planted.write_text(f'#!/bin/sh\ntouch {ran}\nexec {sys.executable} "$@"\n')
    planted.chmod(0o755)
    (env / ".skyward-image").write_text(plan.install_key + "\n")
    (env / ".skyward-code").write_text(plan.code + "\n")
    if how == "owned by another user":
        need(os.geteuid() == 0, "root (to give env_root to another user)")
        os.chown(root, 65534, 65534)  # nobody
        root.chmod(0o755)
        fix = "pass an env_root of your own"
    else:
        root.chmod(0o777 if how == "writable by others" else 0o770)
        fix = f"chmod go-w {root}"
    with pytest.raises(NodeStartError) as info:
        with sky.Compute(provider(ssh_clean, root), nodes=1, image=image):
            pytest.fail("an env_root others can write to must not be used")
    message = str(info.value)
    assert f"env_root {root} is not private" in message and fix in message, message
    assert message.endswith("(step: env_root)")
    assert not ran.exists(), "the planted interpreter ran"


def test_env_root_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "envs"
    args = {"env_root": str(root), "digest": "d", "install_key": "k", "code": "c"}
    host_side("probe", args)
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / "wheels" / "c").stat().st_mode & 0o077 == 0


def test_env_root_under_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone could rename env_root away and replace it
    args = {"env_root": str(shared / "envs"), "digest": "d", "install_key": "k", "code": "c"}
    with pytest.raises(BootstrapError, match=f"inside {shared}, where others could replace it"):
        host_side("probe", args)


# --- lock and marker files are not followed through symlinks ----------------------------------


def test_symlinked_lock_file_is_not_followed(tmp_path: Path, ssh_wheelhouse: str) -> None:
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    plan = bootstrap.Plan.of(image)
    base = plan.args(str(tmp_path / "envs"))
    args = stage(plan, base, ssh_wheelhouse)
    victim = tmp_path / "victim"
    lock = tmp_path / "envs" / f"{plan.digest}.lock"
    lock.symlink_to(victim)
    with pytest.raises(BootstrapError, match=f"{lock} is a symbolic link") as info:
        host_side("prepare", args)
    assert info.value.step == "lock"
    assert not victim.exists(), "the lock was opened through the symlink"
    assert not (tmp_path / "envs" / plan.digest).exists()


def test_symlinked_marker_is_not_trusted(tmp_path: Path) -> None:
    """A marker that is a symlink to a file with the right content does not make the
    environment ready."""
    root = tmp_path / "envs"
    args = {"env_root": str(root), "digest": "d", "install_key": "k", "code": "c"}
    host_side("probe", args)
    (root / "d" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, root / "d" / "bin" / "python")
    (tmp_path / "k").write_text("k\n")
    (tmp_path / "c").write_text("c\n")
    (root / "d" / ".skyward-image").symlink_to(tmp_path / "k")
    (root / "d" / ".skyward-code").write_text("c\n")
    assert host_side("probe", args)["ready"] is False
    (root / "d" / ".skyward-image").unlink()
    (root / "d" / ".skyward-image").write_text("k\n")
    assert host_side("probe", args)["ready"] is True


# --- uploaded files are trusted by content ----------------------------------------------------


def test_a_file_of_the_same_size_on_the_host_is_uploaded_again(tmp_path: Path) -> None:
    local = tmp_path / "pkg-1.0-py3-none-any.whl"
    local.write_bytes(b"the client's wheel")
    root = tmp_path / "envs"
    args = {"env_root": str(root), "digest": "d", "install_key": "k", "code": "c"}
    probe = host_side("probe", args)
    remote = Path(probe["wheelhouse"]) / local.name
    remote.write_bytes(b"another wheel!!!!!")  # same size, other content
    assert remote.stat().st_size == local.stat().st_size
    probe = host_side("probe", args)
    files = {"wheelhouse": {local: host.file_sha256(str(local))}, "wheels": {}}
    assert _uploads(files, probe) == [(local, str(remote))]
    remote.write_bytes(local.read_bytes())
    assert _uploads(files, host_side("probe", args)) == []


def test_an_uploaded_wheel_changed_on_the_host_is_not_installed(
    tmp_path: Path, ssh_wheelhouse: str
) -> None:
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    plan = bootstrap.Plan.of(image)
    args = stage(plan, plan.args(str(tmp_path / "envs")), ssh_wheelhouse)
    name = next(n for n in args["wheelhouse"] if n.startswith("threadpoolctl"))
    path = tmp_path / "envs" / "wheelhouse" / plan.digest / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(data))
    with pytest.raises(BootstrapError, match=f"uploaded file {path} is not the one") as info:
        host_side("prepare", args)
    assert info.value.step == "install packages"


def test_image_repr_shows_env_names_but_not_values() -> None:
    secret = "tok-" + secrets.token_hex(8)
    image = sky.Image(pip=["numpy"], env={"UV_INDEX_URL": f"https://u:{secret}@pypi.example/"})
    text = repr(image)
    assert secret not in text and secret not in str(image)
    assert "'UV_INDEX_URL': '***'" in text and "numpy" in text
    assert image.env["UV_INDEX_URL"].endswith(f"{secret}@pypi.example/")  # still usable
