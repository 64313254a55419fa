"""The client's own code as wheels for the hosts: skyward and every installed skyward plugin.

Editable installs are built from their source tree with ``uv build`` (else pypa
``build``), each using the project's own build backend; installed distributions are
repacked from their files.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from skyward.errors import BootstrapError

__all__ = ["ClientWheels", "build_wheel", "wheel_from_installed"]

BUILD_TIMEOUT = 600.0


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


def _uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.exists() else shutil.which("uv")


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of the project at ``source`` into ``out`` with ``uv build``, else
    pypa ``build`` (``python -m build``); either runs the backend its pyproject names."""
    uv = _uv()
    if uv is not None:
        argv = [uv, "build", "--wheel", "--out-dir", str(out), "."]
    elif importlib.util.find_spec("build") is not None:
        argv = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), "."]
    else:
        raise BootstrapError(
            f"{source} is installed editable, so its wheel must be built, which needs uv or "
            "pypa build on the client: pip install uv (or build)",
            "build wheel",
        )
    before = set(out.glob("*.whl"))
    try:
        proc = subprocess.run(
            argv, cwd=source, capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise BootstrapError(
            f"building a wheel from {source} took over {BUILD_TIMEOUT:.0f}s", "build wheel"
        ) from exc
    wheels = sorted(set(out.glob("*.whl")) - before)
    if proc.returncode != 0 or not wheels:
        raise BootstrapError(
            f"building a wheel from {source} with `{' '.join(argv[:3])}` failed: "
            f"{proc.stderr.strip()[-800:]}",
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
