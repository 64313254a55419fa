"""The part of the bootstrap that runs on the host: standard library only.

This file, and only this file, is shipped to each host (``python -c`` with its
source, see :func:`skyward.bootstrap.remote.remote_command`); it imports nothing of
Skyward. It answers two commands named on its command line; their JSON arguments
arrive on stdin, never on the command line, where every user of the host could read
them (they carry ``Image.env``, e.g. index URLs with tokens). It prints one result
line (``RESULT_MARK`` + JSON) that the client parses:

- ``probe``: is the environment of this image and client code ready, which Python
  and uv does the host have, which uploaded files are already there (by sha256);
- ``prepare``: under a lock, create the virtualenv (uv when the host has it, else
  ``python -m venv`` and pip), install the image's packages, install the client's
  skyward wheels (each checked against the client's sha256 first), and write the
  marker files that say so. Progress lines start with ``STEP_MARK``.

``env_root`` must be private to the login user: it is created with mode 0700, and one
that is owned by someone else or writable by group or others is refused, because
whoever can write there can plant the interpreter the client then runs (and through
it, code on the client). Lock and marker files are opened without following symlinks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from typing import Any

RESULT_MARK = "SKYWARD-RESULT "
STEP_MARK = "SKYWARD-STEP "
LOCK_TIMEOUT = 1800.0
IMAGE_MARKER = ".skyward-image"
CODE_MARKER = ".skyward-code"


class StepError(Exception):
    """A step failed on the host; reported to the client as ``{"error", "step"}``."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


def main(argv: list[str]) -> None:
    """Run ``argv[0]`` (``probe`` or ``prepare``) with the JSON arguments read from stdin."""
    os.umask(0o077)  # everything created here is private to the login user
    command = argv[0]
    try:
        args = json.loads(sys.stdin.read())
        result = {"probe": probe, "prepare": prepare}[command](args)
    except StepError as exc:
        result = {"error": str(exc), "step": exc.step}
    except Exception as exc:  # noqa: BLE001 - reported to the client with the step
        result = {"error": f"{type(exc).__name__}: {exc}", "step": command}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _layout(args: dict[str, Any]) -> dict[str, str]:
    root = os.path.abspath(os.path.expanduser(args["env_root"]))
    digest = args["digest"]
    return {
        "root": root,
        "env": os.path.join(root, digest),
        "lock": os.path.join(root, digest + ".lock"),
        "requirements": os.path.join(root, digest + ".requirements"),
        "wheelhouse": os.path.join(root, "wheelhouse", digest),
        "wheels": os.path.join(root, "wheels", args["code"]),
    }


def _unsafe(st: os.stat_result, owners: tuple[int, ...], sticky_ok: bool) -> str | None:
    """Why others could replace what a folder holds (``None`` when they cannot)."""
    if st.st_uid not in owners:
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    # A sticky folder (/tmp) lets others add entries, but not rename or remove yours.
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        who = "others" if st.st_mode & 0o002 else "its group"
        return f"it is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_root(root: str) -> None:
    """Create ``root`` (mode 0700) if missing; refuse it unless only the login user can
    change what it holds: owned by the user and not writable by group or others, and
    every folder above it owned by the user or root and not writable by group or
    others (sticky folders such as ``/tmp`` excepted)."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    uid = os.geteuid()
    why = (
        "whoever can write there can plant the Python that Skyward runs, and through it "
        "run code on your client"
    )
    reason = _unsafe(os.stat(root), (uid,), sticky_ok=False)
    if reason is not None:
        fix = (
            f"run `chmod go-w {root}`"
            if os.stat(root).st_uid == uid
            else "pass an env_root of your own, e.g. sky.SSH(env_root='~/.cache/skyward/envs')"
        )
        raise StepError(f"env_root {root} is not private: {reason}; {why}. Fix: {fix}", "env_root")
    parent = os.path.dirname(root)
    while True:
        reason = _unsafe(os.stat(parent), (uid, 0), sticky_ok=True)
        if reason is not None:
            raise StepError(
                f"env_root {root} is inside {parent}, where others could replace it: "
                f"{reason}; {why}. Fix: pass an env_root under a folder only you (or root) "
                "can write to, e.g. sky.SSH(env_root='~/.cache/skyward/envs')",
                "env_root",
            )
        if parent == os.path.dirname(parent):
            return
        parent = os.path.dirname(parent)


def _read(path: str) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        return f.read().strip()


def file_sha256(path: str) -> str:
    """The sha256 of the file at ``path`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_uv() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("uv")


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """Whether the environment is ready; the host's Python and uv; files already uploaded
    (path -> sha256)."""
    paths = _layout(args)
    private_root(paths["root"])
    env = paths["env"]
    ready = (
        os.access(os.path.join(env, "bin", "python"), os.X_OK)
        and _read(os.path.join(env, IMAGE_MARKER)) == args["install_key"]
        and _read(os.path.join(env, CODE_MARKER)) == args["code"]
    )
    present: dict[str, str] = {}
    if not ready:
        for folder in (paths["wheelhouse"], paths["wheels"]):
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    present[path] = file_sha256(path)
    return {
        **paths,
        "ready": ready,
        "python": ".".join(str(v) for v in sys.version_info[:3]),
        "executable": sys.executable,
        "uv": _find_uv(),
        "present": present,
    }


def _step(name: str) -> None:
    sys.stdout.write(STEP_MARK + name + "\n")
    sys.stdout.flush()


def _run(argv: list[str], step: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise StepError(f"`{' '.join(argv[:4])} ...` failed ({proc.returncode}):\n{tail}", step)


def _open_private(path: str, flags: int, step: str) -> int:
    """Open ``path`` without following a symlink there; a symlink is an error naming it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if os.path.islink(path):
            raise StepError(
                f"{path} is a symbolic link, which Skyward does not follow: delete it "
                "(nothing but Skyward should create files there)",
                step,
            ) from None
        raise StepError(f"cannot open {path}: {exc}", step) from None


def _lock(path: str) -> int:
    # This file runs alone on the host, so it has its own bounded retry loop.
    fd = _open_private(path, os.O_RDWR | os.O_CREAT, "lock")
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise StepError(
                    f"another client has held {path} for {LOCK_TIMEOUT:.0f}s; if no bootstrap "
                    "is running there, delete that file",
                    "lock",
                ) from None
            time.sleep(0.1)


def _write_private(path: str, text: str, step: str) -> None:
    """Write ``text`` to a new file at ``path`` (replacing a regular file, never
    following a symlink)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = _open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, step)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _write_marker(path: str, value: str, step: str) -> None:
    # The agent command's `read` needs the newline.
    _write_private(path + ".tmp", value + "\n", step)
    os.replace(path + ".tmp", path)


def _verified(folder: str, hashes: dict[str, str], step: str) -> list[str]:
    """The paths of the files named in ``hashes``, each checked against its sha256."""
    paths = []
    for name, expected in sorted(hashes.items()):
        path = os.path.join(folder, os.path.basename(name))
        try:
            got = file_sha256(path) if not os.path.islink(path) else "a symbolic link"
        except OSError as exc:
            raise StepError(f"uploaded file {path} cannot be read: {exc}", step) from None
        if got != expected:
            raise StepError(
                f"uploaded file {path} is not the one the client sent (sha256 {got[:16]}, "
                f"expected {expected[:16]}): it changed on the host; delete it and retry",
                step,
            )
        paths.append(path)
    return paths


def prepare(args: dict[str, Any]) -> dict[str, Any]:
    """Create or complete the environment; return its interpreter and the steps done."""
    paths = _layout(args)
    env = paths["env"]
    python = os.path.join(env, "bin", "python")
    uv = _find_uv() if args.get("uv", True) else None
    done: list[str] = []
    private_root(paths["root"])
    fd = _lock(paths["lock"])
    try:
        if _read(os.path.join(env, IMAGE_MARKER)) != args["install_key"]:
            _step("create venv")
            shutil.rmtree(env, ignore_errors=True)
            if uv:
                _run([uv, "venv", "--quiet", "--python", sys.executable, env], "create venv")
            else:
                try:
                    _run([sys.executable, "-m", "venv", env], "create venv")
                except StepError as exc:
                    raise StepError(
                        f"{exc} (install uv, or the python3-venv package, on the host)",
                        "create venv",
                    ) from None
            done.append("create venv")
            _step("install packages")
            source: list[str] = []
            if args["offline"]:
                _verified(paths["wheelhouse"], args["wheelhouse"], "install packages")
                source = ["--no-index", "--find-links", paths["wheelhouse"]]
            # The requirements travel in a private file: a URL with a token stays off argv.
            requirements = paths["requirements"]
            lines = "".join(p + "\n" for p in args["packages"])
            _write_private(requirements, lines, "install packages")
            try:
                _install(uv, python, [*source, "-r", requirements], "install packages", args["env"])
            finally:
                os.unlink(requirements)
            _write_marker(os.path.join(env, IMAGE_MARKER), args["install_key"], "install packages")
            done.append("install packages")
        if _read(os.path.join(env, CODE_MARKER)) != args["code"]:
            _step("install skyward")
            wheels = _verified(paths["wheels"], args["wheels"], "install skyward")
            reinstall = ["--no-deps", "--force-reinstall", *wheels]
            _install(uv, python, reinstall, "install skyward", args["env"])
            _write_marker(os.path.join(env, CODE_MARKER), args["code"], "install skyward")
            done.append("install skyward")
    finally:
        os.close(fd)
    return {"python": python, "steps": done}


def _install(uv: str | None, python: str, args: list[str], step: str, env: dict[str, str]) -> None:
    if uv:
        args = ["--reinstall" if a == "--force-reinstall" else a for a in args]
        _run([uv, "pip", "install", "--quiet", "--python", python, *args], step, env)
    else:
        quiet = ["--quiet", "--disable-pip-version-check"]
        _run([python, "-m", "pip", "install", *quiet, *args], step, env)


if __name__ == "__main__":
    main(sys.argv[2:])  # python -c <loader> <payload> <command>; arguments on stdin
