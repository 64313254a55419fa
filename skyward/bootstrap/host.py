"""The part of the bootstrap that runs on the host: standard library only.

This file, and only this file, is shipped to each host (``python -c`` with its
source, see :func:`skyward.bootstrap.remote.remote_command`); it imports nothing of
Skyward. It answers two commands, each with one JSON argument, and prints one
result line (``RESULT_MARK`` + JSON) that the client parses:

- ``probe``: is the environment of this image and client code ready, which Python
  and uv does the host have, which uploaded files are already there;
- ``prepare``: under a lock, create the virtualenv (uv when the host has it, else
  ``python -m venv`` and pip), install the image's packages, install the client's
  skyward wheels, and write the marker files that say so. Progress lines start
  with ``STEP_MARK``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
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
    """Run ``argv[0]`` (``probe`` or ``prepare``) with the JSON arguments ``argv[1]``."""
    command, args = argv[0], json.loads(argv[1])
    try:
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
        "wheelhouse": os.path.join(root, "wheelhouse", digest),
        "wheels": os.path.join(root, "wheels", args["code"]),
    }


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _find_uv() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("uv")


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """Whether the environment is ready; the host's Python and uv; files already uploaded."""
    paths = _layout(args)
    env = paths["env"]
    ready = (
        os.access(os.path.join(env, "bin", "python"), os.X_OK)
        and _read(os.path.join(env, IMAGE_MARKER)) == args["install_key"]
        and _read(os.path.join(env, CODE_MARKER)) == args["code"]
    )
    present: dict[str, int] = {}
    if not ready:
        for folder in (paths["wheelhouse"], paths["wheels"]):
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(folder):
                present[os.path.join(folder, name)] = os.path.getsize(os.path.join(folder, name))
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise StepError(f"`{' '.join(argv[:4])} ...` failed ({proc.returncode}):\n{tail}", step)


def _lock(path: str) -> int:
    # This file runs alone on the host, so it has its own bounded retry loop.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _write_marker(path: str, value: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(value + "\n")  # read(1) in the agent command needs the newline
    os.replace(path + ".tmp", path)


def prepare(args: dict[str, Any]) -> dict[str, Any]:
    """Create or complete the environment; return its interpreter and the steps done."""
    paths = _layout(args)
    env = paths["env"]
    python = os.path.join(env, "bin", "python")
    uv = _find_uv() if args.get("uv", True) else None
    done: list[str] = []
    os.makedirs(paths["root"], exist_ok=True)
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
            source = ["--no-index", "--find-links", paths["wheelhouse"]] if args["offline"] else []
            _install(uv, python, [*source, *args["packages"]], "install packages", args["env"])
            _write_marker(os.path.join(env, IMAGE_MARKER), args["install_key"])
            done.append("install packages")
        if _read(os.path.join(env, CODE_MARKER)) != args["code"]:
            _step("install skyward")
            wheels = [os.path.join(paths["wheels"], name) for name in args["wheels"]]
            reinstall = ["--no-deps", "--force-reinstall", *wheels]
            _install(uv, python, reinstall, "install skyward", args["env"])
            _write_marker(os.path.join(env, CODE_MARKER), args["code"])
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
    main(sys.argv[2:])  # python -c <loader> <payload> <command> <json>
