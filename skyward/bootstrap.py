"""Prepare a host's Python environment for the agent (SSH and AWS nodes).

Each host gets a virtualenv under ``<env_root>/<image digest>`` (``uv`` when the
host has it, else ``python -m venv`` and pip) holding the image's packages and
the client's own skyward build, so both ends run the same code. A second
cluster with the same image finds the environment ready and installs nothing.

The work on the host is done by this very file: its source is shipped with
``python -c`` and runs :func:`_remote_main`, so everything at module level is
standard library only. The client half (:func:`prepare`) probes, uploads what
is missing over SFTP and asks the host to install it, logging each step on the
``skyward.bootstrap`` logger (``record.step``, ``record.host``).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import paramiko

    from skyward.spec import Image

RESULT_MARK = "SKYWARD-RESULT "
STEP_MARK = "SKYWARD-STEP "
# Steps that change the host; a warm start logs none of them.
INSTALL_STEPS = ("upload", "create venv", "install packages", "install skyward")
PROBE_TIMEOUT = 60.0
PREPARE_TIMEOUT = 1800.0
LOCK_TIMEOUT = 1800.0


class BootstrapError(RuntimeError):
    """A host could not be prepared; ``step`` names what failed."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


# --- host side (standard library only) ------------------------------------------------------


def _remote_main(argv: list[str]) -> None:
    command, args = argv[0], json.loads(argv[1])
    try:
        result = {"probe": _probe, "prepare": _prepare}[command](args)
    except BootstrapError as exc:
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


def _probe(args: dict[str, Any]) -> dict[str, Any]:
    paths = _layout(args)
    env = paths["env"]
    ready = (
        os.access(os.path.join(env, "bin", "python"), os.X_OK)
        and _read(os.path.join(env, ".skyward-image")) == args["install_key"]
        and _read(os.path.join(env, ".skyward-code")) == args["code"]
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
        raise BootstrapError(
            f"`{' '.join(argv[:4])} ...` failed ({proc.returncode}):\n{tail}", step
        )


def _lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise BootstrapError(
                    f"another client has held {path} for {LOCK_TIMEOUT:.0f}s; if no bootstrap "
                    "is running there, delete that file",
                    "lock",
                ) from None
            time.sleep(0.1)


def _write_marker(path: str, value: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(value)
    os.replace(path + ".tmp", path)


def _prepare(args: dict[str, Any]) -> dict[str, Any]:
    paths = _layout(args)
    env = paths["env"]
    python = os.path.join(env, "bin", "python")
    uv = _find_uv() if args.get("uv", True) else None
    done: list[str] = []
    fd = _lock(paths["lock"])
    try:
        if _read(os.path.join(env, ".skyward-image")) != args["install_key"]:
            _step("create venv")
            shutil.rmtree(env, ignore_errors=True)
            if uv:
                _run([uv, "venv", "--quiet", "--python", sys.executable, env], "create venv")
            else:
                try:
                    _run([sys.executable, "-m", "venv", env], "create venv")
                except BootstrapError as exc:
                    raise BootstrapError(
                        f"{exc} (install uv, or the python3-venv package, on the host)",
                        "create venv",
                    ) from None
            done.append("create venv")
            _step("install packages")
            source = ["--no-index", "--find-links", paths["wheelhouse"]] if args["offline"] else []
            _install(uv, python, [*source, *args["packages"]], "install packages", args["env"])
            _write_marker(os.path.join(env, ".skyward-image"), args["install_key"])
            done.append("install packages")
        if _read(os.path.join(env, ".skyward-code")) != args["code"]:
            _step("install skyward")
            wheel = os.path.join(paths["wheels"], args["wheel"])
            reinstall = ["--no-deps", "--force-reinstall", wheel]
            _install(uv, python, reinstall, "install skyward", args["env"])
            _write_marker(os.path.join(env, ".skyward-code"), args["code"])
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


# --- client side ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _payload() -> str:
    return base64.b64encode(zlib.compress(Path(__file__).read_bytes(), 9)).decode()


def remote_command(python: str, command: str, args: dict[str, Any]) -> str:
    """The shell command that runs this file's host side with ``python``."""
    import shlex

    payload = _payload()
    loader = (
        "import base64,sys,zlib;"
        "exec(compile(zlib.decompress(base64.b64decode(sys.argv[1])),'skyward-bootstrap','exec'))"
    )
    argv = [python, "-c", loader, payload, command, json.dumps(args)]
    return " ".join(shlex.quote(a) for a in argv)


def run_remote(
    client: paramiko.SSHClient,
    command: str,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
) -> tuple[int, str, str]:
    """Run ``command`` on the host; return ``(exit code, stdout, stderr)`` within ``timeout``."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError("the SSH connection is closed")
    channel = transport.open_session(timeout=min(timeout, 30.0))
    out, err = bytearray(), bytearray()
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        channel.exec_command(command)
        while True:
            if channel.recv_ready():
                out += channel.recv(1 << 16)
                while on_line is not None and b"\n" in out[seen:]:
                    end = out.index(b"\n", seen)
                    on_line(out[seen:end].decode("utf-8", "replace"))
                    seen = end + 1
            elif channel.recv_stderr_ready():
                err += channel.recv_stderr(1 << 16)
            elif channel.closed or (channel.exit_status_ready() and channel.eof_received):
                break
            elif time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {timeout:.0f}s")
            else:
                time.sleep(0.005)
        # Drain what arrived with the exit status.
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(1 << 16)
        return (
            channel.recv_exit_status(),
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )
    finally:
        channel.close()


def _parse(step: str, code: int, out: str, err: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            if "error" in result:
                raise BootstrapError(result["error"], result.get("step", step))
            return result
    detail = (err.strip() or out.strip() or f"exit code {code}")[-800:]
    raise BootstrapError(f"the bootstrap script did not run: {detail}", step)


def prepare(
    client: paramiko.SSHClient,
    host: str,
    image: Image,
    python: str,
    env_root: str,
    logger: Callable[[str, str], None],
) -> str:
    """Make sure ``image``'s environment is ready on the host; return its interpreter path.

    ``logger(step, message)`` is called for every step. Raises :class:`BootstrapError`.
    """
    wheel = SkywardWheel.shared()
    packages = _packages(image)
    # The folder is named by the image; the marker inside also covers the agent's own
    # dependencies (pinned like the client), so a client upgrade rebuilds the env.
    install_key = hashlib.sha256(json.dumps([image.digest(), packages]).encode()).hexdigest()
    base = {
        "env_root": env_root,
        "digest": image.digest(),
        "install_key": install_key[:16],
        "code": wheel.code,
    }
    logger("probe", f"checking {env_root}/{base['digest']} with {python}")
    probe = _call(client, python, "probe", base, PROBE_TIMEOUT, "probe")
    version = ".".join(probe["python"].split(".")[:2])
    if version != image.python:
        raise BootstrapError(
            f"{python} on {host} is Python {probe['python']} but the image needs "
            f"{image.python}: pass sky.SSH(python='/path/to/python{image.python}') or "
            f"sky.Image(python='{version}') (the client must run the same minor version)",
            "probe",
        )
    env_python = str(probe["env"]) + "/bin/python"
    if probe["ready"]:
        logger("ready", f"environment {base['digest']} is ready (warm start)")
        return env_python
    uploads = _uploads(image, wheel, probe)
    if uploads:
        logger("upload", f"uploading {len(uploads)} file(s) over SFTP")
        _upload(client, uploads)
    args = {
        **base,
        "packages": packages,
        "offline": image.wheelhouse is not None,
        # The image's variables reach the installer too (PIP_INDEX_URL, UV_INDEX_URL, ...).
        "env": dict(image.env),
        "wheel": wheel.path.name,
    }
    installer = "uv" if probe["uv"] else "python -m venv + pip"
    logger("prepare", f"preparing environment {base['digest']} with {installer}")

    def progress(line: str) -> None:
        if line.startswith(STEP_MARK):
            logger(line[len(STEP_MARK) :], f"{line[len(STEP_MARK) :]} ({installer})")

    _call(client, python, "prepare", args, PREPARE_TIMEOUT, "prepare", progress)
    return env_python


def _call(
    client: paramiko.SSHClient,
    python: str,
    command: str,
    args: dict[str, Any],
    timeout: float,
    step: str,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    try:
        code, out, err = run_remote(client, remote_command(python, command, args), timeout, on_line)
    except (OSError, TimeoutError, EOFError) as exc:
        raise BootstrapError(f"{type(exc).__name__}: {exc}", step) from exc
    if code == 127 or ("not found" in err and RESULT_MARK not in out):
        raise BootstrapError(
            f"{python!r} was not found on the host ({err.strip()[-200:]}): install Python "
            f"there or pass sky.SSH(python='/absolute/path/to/python3')",
            step,
        )
    return _parse(step, code, out, err)


def _packages(image: Image) -> list[str]:
    """The image's requirements plus what the agent itself imports (pinned like the client)."""
    import cloudpickle

    wanted = dict(image.requirements())
    wanted.setdefault("cloudpickle", f"cloudpickle=={cloudpickle.__version__}")
    wanted.setdefault("lz4", "lz4>=4.0")
    wanted.setdefault("pluggy", "pluggy>=1.3")
    return list(wanted.values())


def _uploads(image: Image, wheel: SkywardWheel, probe: dict[str, Any]) -> list[tuple[Path, str]]:
    present: dict[str, int] = probe["present"]
    files = [(wheel.path, f"{probe['wheels']}/{wheel.path.name}")]
    if image.wheelhouse is not None:
        for path in sorted(Path(image.wheelhouse).iterdir()):
            if path.is_file():
                files.append((path, f"{probe['wheelhouse']}/{path.name}"))
    return [
        (local, remote) for local, remote in files if present.get(remote) != local.stat().st_size
    ]


def _upload(client: paramiko.SSHClient, files: list[tuple[Path, str]]) -> None:
    try:
        sftp = client.open_sftp()
    except Exception as exc:
        raise BootstrapError(
            f"SFTP is not available ({exc}): enable it in sshd_config "
            "('Subsystem sftp internal-sftp')",
            "upload",
        ) from exc
    try:
        for local, remote in files:
            # Upload then rename: clients bootstrapping the same shared home stay consistent.
            partial = f"{remote}.part-{os.getpid()}-{threading.get_ident()}"
            sftp.put(str(local), partial)
            sftp.posix_rename(partial, remote)
    except OSError as exc:
        raise BootstrapError(f"uploading failed: {exc}", "upload") from exc
    finally:
        sftp.close()


class SkywardWheel:
    """The client's own skyward as a wheel, built once per process, removed at exit."""

    _shared: SkywardWheel | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import skyward

        self.package = Path(skyward.__file__).resolve().parent
        self.code = _tree_hash(self.package)
        self._path: Path | None = None
        self._build_lock = threading.Lock()

    @classmethod
    def shared(cls) -> SkywardWheel:
        """The process-wide instance (its code hash is computed once)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @property
    def path(self) -> Path:
        """The wheel file, built on first use."""
        with self._build_lock:
            if self._path is None:
                out = Path(tempfile.mkdtemp(prefix="skyward-wheel-"))
                import atexit

                atexit.register(shutil.rmtree, out, True)
                self._path = self._build(out)
            return self._path

    def _build(self, out: Path) -> Path:
        source = self.package.parent
        pyproject = source / "pyproject.toml"
        if pyproject.is_file() and 'name = "skyward"' in pyproject.read_text():
            return build_wheel(source, out)
        return wheel_from_installed("skyward", out)


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of the project at ``source`` into ``out`` (hatchling, else ``uv build``)."""
    import importlib.util

    if importlib.util.find_spec("hatchling") is not None:
        argv = [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)]
    else:
        uv = Path(sys.executable).parent / "uv"
        argv = [str(uv) if uv.exists() else "uv", "build", "--wheel", "--out-dir", str(out), "."]
    proc = subprocess.run(argv, cwd=source, capture_output=True, text=True, timeout=600)
    wheels = sorted(out.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise BootstrapError(
            f"building the skyward wheel from {source} failed: {proc.stderr.strip()[-800:]} "
            "(install hatchling or uv on the client)",
            "build wheel",
        )
    return wheels[-1]


def wheel_from_installed(name: str, out: Path) -> Path:
    """Pack the installed distribution ``name`` back into a wheel in ``out``.

    For distributions installed from wheels (not editable installs); a binary
    distribution keeps its platform tags, so it fits hosts like this one.
    """
    import csv
    import io
    import zipfile
    from importlib import metadata

    dist = metadata.distribution(name)
    wheel_meta = dist.read_text("WHEEL") or ""
    tags = [
        line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")
    ]
    if not tags or dist.files is None:
        raise BootstrapError(
            f"{name} was not installed from a wheel; cannot repack it", "build wheel"
        )
    parts = [sorted({t.split("-")[i] for t in tags}) for i in range(3)]
    tag = "-".join(".".join(p) for p in parts)
    dist_name = dist.metadata["Name"].replace("-", "_")
    path = out / f"{dist_name}-{dist.version}-{tag}.whl"
    record_rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        record_name = None
        for file in dist.files:
            arcname = file.as_posix()
            if arcname.startswith("..") or "__pycache__" in arcname:
                continue
            if arcname.endswith(".dist-info/RECORD"):
                record_name = arcname
                continue
            data = Path(str(file.locate())).read_bytes()
            zf.writestr(arcname, data)
            sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record_rows.append((arcname, f"sha256={sha}", str(len(data))))
        if record_name is None:
            raise BootstrapError(f"{name} has no RECORD file; cannot repack it", "build wheel")
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([*record_rows, (record_name, "", "")])
        zf.writestr(record_name, buffer.getvalue())
    return path


if __name__ == "__main__":
    _remote_main(sys.argv[2:])
