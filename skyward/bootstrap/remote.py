"""Running the host side over SSH: commands, their output, and SFTP uploads.

:func:`run_remote` waits on the channel itself (``select`` on paramiko's channel
pipe, which wakes on output, end of file and close), never in a sleep loop.
A command line is visible to every user of the host (``ps``), so the host side's
arguments, secrets included, travel on the channel's stdin instead.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import select
import shlex
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skyward.bootstrap import host
from skyward.errors import BootstrapError

if TYPE_CHECKING:
    import paramiko

__all__ = ["call", "encode_args", "parse_result", "remote_command", "run_remote", "upload"]

_CHUNK = 1 << 16


@functools.lru_cache(maxsize=1)
def _payload() -> str:
    return base64.b64encode(zlib.compress(Path(host.__file__).read_bytes(), 9)).decode()


def remote_command(python: str, command: str) -> str:
    """The shell command that runs :mod:`skyward.bootstrap.host`'s ``command`` with ``python``;
    it reads its JSON arguments (:func:`encode_args`) from stdin.

    Only ``host.py`` travels (compressed, as an argument): no other client code.
    """
    loader = (
        "import base64,sys,zlib;"
        "exec(compile(zlib.decompress(base64.b64decode(sys.argv[1])),'skyward-bootstrap','exec'))"
    )
    argv = [python, "-c", loader, _payload(), command]
    return " ".join(shlex.quote(a) for a in argv)


def encode_args(args: dict[str, Any]) -> bytes:
    """The stdin of :func:`remote_command`: its arguments as JSON."""
    return json.dumps(args).encode()


class _Lines:
    """Calls ``on_line`` for each complete line of a growing byte buffer."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.seen = 0

    def feed(self, out: bytearray) -> None:
        while self.on_line is not None and b"\n" in out[self.seen :]:
            end = out.index(b"\n", self.seen)
            self.on_line(out[self.seen : end].decode("utf-8", "replace"))
            self.seen = end + 1


def run_remote(
    client: paramiko.SSHClient,
    command: str,
    timeout: float,
    on_line: Callable[[str], None] | None = None,
    stdin: bytes | None = None,
) -> tuple[int, str, str]:
    """Run ``command`` on the host; return ``(exit code, stdout, stderr)`` within ``timeout``.

    ``on_line`` sees each stdout line as it arrives. ``stdin`` is sent to the command,
    then its stdin is closed (without it, stdin stays open).
    """
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise ConnectionError("the SSH connection is closed")
    channel = transport.open_session(timeout=min(timeout, 30.0))
    out, err = bytearray(), bytearray()
    lines = _Lines(on_line)
    deadline = time.monotonic() + timeout
    try:
        channel.exec_command(command)
        if stdin is not None:
            channel.sendall(stdin)
            channel.shutdown_write()
        # Readable on new output, EOF or close; cleared once both buffers are drained.
        ready = channel.fileno()
        while True:
            finished = channel.eof_received or channel.closed  # nothing more can arrive
            while channel.recv_ready():
                out += channel.recv(_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(_CHUNK)
            lines.feed(out)
            if finished:
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready], [], [], left)[0]:
                raise TimeoutError(f"no answer within {timeout:.0f}s")
        if not channel.status_event.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"no exit status within {timeout:.0f}s")
        return (
            channel.recv_exit_status(),
            out.decode("utf-8", "replace"),
            err.decode("utf-8", "replace"),
        )
    finally:
        channel.close()


def parse_result(step: str, code: int, out: str, err: str) -> dict[str, Any]:
    """The result line of a host-side command, or :class:`BootstrapError` naming the step."""
    for line in reversed(out.splitlines()):
        if line.startswith(host.RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(host.RESULT_MARK) :])
            if "error" in result:
                raise BootstrapError(result["error"], result.get("step", step))
            return result
    detail = (err.strip() or out.strip() or f"exit code {code}")[-800:]
    raise BootstrapError(f"the bootstrap script did not run: {detail}", step)


def call(
    client: paramiko.SSHClient,
    python: str,
    command: str,
    args: dict[str, Any],
    timeout: float,
    step: str,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the host side's ``command`` with ``python`` and ``args`` (over stdin); return
    its result."""
    try:
        line = remote_command(python, command)
        code, out, err = run_remote(client, line, timeout, on_line, encode_args(args))
    except (OSError, TimeoutError, EOFError) as exc:
        raise BootstrapError(f"{type(exc).__name__}: {exc}", step) from exc
    if code == 127 or ("not found" in err and host.RESULT_MARK not in out):
        raise BootstrapError(
            f"{python!r} was not found on the host ({err.strip()[-200:]}): install Python "
            f"there or pass sky.SSH(python='/absolute/path/to/python3')",
            step,
        )
    return parse_result(step, code, out, err)


def upload(client: paramiko.SSHClient, files: list[tuple[Path, str]]) -> None:
    """Copy each ``(local, remote path)`` over SFTP; a file appears under its name only
    once complete, so clients bootstrapping one shared home stay consistent."""
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
            partial = f"{remote}.part-{os.getpid()}-{threading.get_ident()}"
            sftp.put(str(local), partial)
            sftp.posix_rename(partial, remote)
    except OSError as exc:
        raise BootstrapError(f"uploading failed: {exc}", "upload") from exc
    finally:
        sftp.close()
