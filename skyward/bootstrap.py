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
from dataclasses import dataclass
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
        f.write(value + "\n")  # read(1) in the agent command needs the newline
    os.replace(path + ".tmp", path)


def _prepare(args: dict[str, Any]) -> dict[str, Any]:
    paths = _layout(args)
    env = paths["env"]
    python = os.path.join(env, "bin", "python")
    uv = _find_uv() if args.get("uv", True) else None
    done: list[str] = []
    os.makedirs(paths["root"], exist_ok=True)
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
            wheels = [os.path.join(paths["wheels"], name) for name in args["wheels"]]
            reinstall = ["--no-deps", "--force-reinstall", *wheels]
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


NOT_READY = 97
"""Exit status of :func:`agent_command` when the environment must be prepared first."""


@dataclass(frozen=True)
class Plan:
    """What the environment of one image holds, and the markers that say it is ready."""

    image: Image
    digest: str
    install_key: str
    code: str
    packages: tuple[str, ...]

    @classmethod
    def of(cls, image: Image) -> Plan:
        """The plan for ``image`` with this client's skyward build."""
        from skyward.spec import requirement_name

        wheels = ClientWheels.shared()
        packages = _packages(image, exclude={requirement_name(d) for d in wheels.packages})
        # The folder is named by the image; the marker inside also covers the agent's own
        # dependencies (pinned like the client), so a client upgrade rebuilds the env.
        key = hashlib.sha256(json.dumps([image.digest(), packages]).encode()).hexdigest()
        return cls(image, image.digest(), key[:16], wheels.code, tuple(packages))

    def args(self, env_root: str) -> dict[str, Any]:
        """Arguments of the host-side commands."""
        return {
            "env_root": env_root,
            "digest": self.digest,
            "install_key": self.install_key,
            "code": self.code,
        }


def _shell_path(path: str) -> str:
    """``path`` quoted for sh, with a leading ``~`` expanded by the host's shell."""
    import shlex

    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + shlex.quote(path[1:]) if len(path) > 1 else '"$HOME"'
    return shlex.quote(path)


def agent_command(plan: Plan, env_root: str) -> str:
    """Shell command that starts the agent if the environment is ready, else exits
    :data:`NOT_READY`: a warm start costs one remote command, not two."""
    import shlex

    from skyward.channel import AGENT_PID_MARK

    env = f"{_shell_path(env_root.rstrip('/'))}/{plan.digest}"
    # sh (not the login shell, which may be slow or print) announces its pid, which
    # exec keeps for the agent, on stderr.
    script = (
        f"E={env}; "
        f'{{ [ -x "$E/bin/python" ] && read -r I < "$E/.skyward-image" && read -r C < '
        f'"$E/.skyward-code" && [ "$I" = {plan.install_key} ] && [ "$C" = {plan.code} ]; }} '
        f"2>/dev/null || exit {NOT_READY}; "
        f"echo {AGENT_PID_MARK.decode()}$$ >&2; "
        'exec env PYTHONUNBUFFERED=1 "$E/bin/python" -m skyward.agent'
    )
    return f"exec sh -c {shlex.quote(script)}"


def prepare(
    client: paramiko.SSHClient,
    host: str,
    plan: Plan,
    python: str,
    env_root: str,
    logger: Callable[[str, str], None],
) -> None:
    """Create or complete ``plan``'s environment on the host with its ``python``.

    ``logger(step, message)`` is called for every step. Raises :class:`BootstrapError`.
    """
    image = plan.image
    base = plan.args(env_root)
    logger("probe", f"checking {env_root}/{plan.digest} with {python}")
    probe = _call(client, python, "probe", base, PROBE_TIMEOUT, "probe")
    version = ".".join(probe["python"].split(".")[:2])
    if version != image.python:
        raise BootstrapError(
            f"{python} on {host} is Python {probe['python']} but the image needs "
            f"{image.python}: pass sky.SSH(python='/path/to/python{image.python}') or "
            f"sky.Image(python='{version}') (the client must run the same minor version)",
            "probe",
        )
    if probe["ready"]:
        return  # another client finished it meanwhile
    wheels = ClientWheels.shared()
    uploads = _uploads(image, wheels, probe)
    if uploads:
        logger("upload", f"uploading {len(uploads)} file(s) over SFTP")
        _upload(client, uploads)
    args = {
        **base,
        "packages": list(plan.packages),
        "offline": image.wheelhouse is not None,
        # The image's variables reach the installer too (PIP_INDEX_URL, UV_INDEX_URL, ...).
        "env": dict(image.env),
        "wheels": [path.name for path in wheels.paths],
    }
    installer = "uv" if probe["uv"] else "python -m venv + pip"
    logger("prepare", f"preparing environment {plan.digest} with {installer}")

    def progress(line: str) -> None:
        if line.startswith(STEP_MARK):
            logger(line[len(STEP_MARK) :], f"{line[len(STEP_MARK) :]} ({installer})")

    _call(client, python, "prepare", args, PREPARE_TIMEOUT, "prepare", progress)


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


def _packages(image: Image, exclude: set[str]) -> list[str]:
    """The image's requirements plus what the agent itself imports (pinned like the client),
    without the distributions in ``exclude`` (shipped as the client's own wheels)."""
    import cloudpickle

    from skyward.spec import requirement_name

    wanted = [r for r in image.pip if requirement_name(r) not in exclude]
    names = {requirement_name(r) for r in wanted}
    agent_needs = {
        "cloudpickle": f"cloudpickle=={cloudpickle.__version__}",
        "lz4": "lz4>=4.0",
        "pluggy": "pluggy>=1.3",
        "packaging": "packaging>=22",
    }
    return wanted + [req for name, req in agent_needs.items() if name not in names]


def _uploads(image: Image, wheels: ClientWheels, probe: dict[str, Any]) -> list[tuple[Path, str]]:
    present: dict[str, int] = probe["present"]
    files = [(path, f"{probe['wheels']}/{path.name}") for path in wheels.paths]
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


class ClientWheels:
    """The client's own skyward and installed skyward plugins, as wheels for the hosts.

    Plugins (distributions with ``skyward`` entry points) ship too, because tasks
    refer to their code (e.g. the joblib batch wrapper). ``code`` hashes their
    packages' files; the wheels are built on first use, once per process, into a
    temporary folder removed at exit.
    """

    _shared: ClientWheels | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.packages = _shipped_packages()
        digest = hashlib.sha256()
        for dist, path in sorted(self.packages.items()):
            digest.update(f"{dist}={_tree_hash(path)};".encode())
        self.code = digest.hexdigest()[:16]
        self._paths: list[Path] | None = None
        self._build_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ClientWheels:
        """The process-wide instance (its code hash is computed once)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @property
    def paths(self) -> list[Path]:
        """The wheel files, built on first use."""
        with self._build_lock:
            if self._paths is None:
                import atexit

                out = Path(tempfile.mkdtemp(prefix="skyward-wheels-"))
                atexit.register(shutil.rmtree, out, True)
                self._paths = [_client_wheel(dist, out) for dist in sorted(self.packages)]
            return self._paths


def _shipped_packages() -> dict[str, Path]:
    """Distribution name -> its package folder (or module file): skyward and its plugins."""
    import importlib.util
    from importlib import metadata

    import skyward

    found = {"skyward": Path(skyward.__file__).resolve().parent}
    for entry in metadata.entry_points(group="skyward"):
        dist = getattr(entry, "dist", None)
        spec = importlib.util.find_spec(entry.module.split(".")[0])
        if dist is None or spec is None:
            continue
        if spec.submodule_search_locations:
            found[dist.name] = Path(list(spec.submodule_search_locations)[0]).resolve()
        elif spec.origin:
            found[dist.name] = Path(spec.origin).resolve()
    return found


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(path.rglob("*"))
    for file in files:
        if file.is_file() and "__pycache__" not in file.parts and file.suffix != ".pyc":
            digest.update(
                file.name.encode() if file == path else str(file.relative_to(path)).encode()
            )
            digest.update(b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _client_wheel(dist_name: str, out: Path) -> Path:
    """A wheel of the installed ``dist_name``: built from its source when installed
    editable, else repacked from its installed files."""
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    direct = metadata.distribution(dist_name).read_text("direct_url.json")
    info = json.loads(direct) if direct else {}
    if info.get("dir_info", {}).get("editable"):
        return build_wheel(Path(unquote(urlparse(info["url"]).path)), out)
    return wheel_from_installed(dist_name, out)


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of the project at ``source`` into ``out`` (hatchling, else ``uv build``)."""
    import importlib.util

    pyproject = source / "pyproject.toml"
    hatch = pyproject.is_file() and "hatchling" in pyproject.read_text()
    before = set(out.glob("*.whl"))
    if hatch and importlib.util.find_spec("hatchling") is not None:
        argv = [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)]
    else:
        uv = Path(sys.executable).parent / "uv"
        argv = [str(uv) if uv.exists() else "uv", "build", "--wheel", "--out-dir", str(out), "."]
    proc = subprocess.run(argv, cwd=source, capture_output=True, text=True, timeout=600)
    wheels = sorted(set(out.glob("*.whl")) - before)
    if proc.returncode != 0 or not wheels:
        raise BootstrapError(
            f"building a wheel from {source} failed: {proc.stderr.strip()[-800:]} "
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
