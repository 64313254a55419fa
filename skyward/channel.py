"""Byte-stream channels to a running agent.

A channel is where frames travel: the agent's stdin (``writer``) and stdout
(``reader``), plus its stderr, forwarded line by line to the client's stderr
with the node's name in front. Every provider produces channels; everything
above this module (nodes, scheduler, Compute) is the same for all of them.
A local agent's pipes are served by the client's one I/O loop (:mod:`skyward.io`).
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING

from skyward import io as skyio
from skyward import wire
from skyward.waits import call_with_timeout

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("skyward.worker")


class Channel(ABC):
    """A started agent and the byte streams that reach it."""

    name: str
    reader: IO[bytes]
    writer: IO[bytes]

    @abstractmethod
    def attach(
        self,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        """Start handing the agent's frames to ``on_frame(kind, body, wire_size)``;
        ``on_end(reason)`` once when the stream ends or breaks."""

    @abstractmethod
    def open_writer(self, on_broken: Callable[[], object]) -> skyio.FrameSink:
        """The queue this channel's frames are written from; ``on_broken`` when writing fails."""

    @abstractmethod
    def close(self, timeout: float = 2.0) -> None:
        """Close the agent's stdin, wait up to ``timeout`` for it to exit, then kill it."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the agent now (used when it stopped answering)."""

    @property
    def pid(self) -> int | None:
        """The agent's process id on its host, when known."""
        return None


# Terminal escape sequences (CSI in 7 and 8 bits, OSC/DCS/APC/PM strings, two-byte ESC
# codes), then any other control character but tab: C0, DEL and C1.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\|$)"
    r"|\x1b[ -/]*[0-~]?"
    r"|[\x00-\x08\x0a-\x1f\x7f-\x9f]"
)


def printable(text: str) -> str:
    """``text`` without terminal control: escape sequences and control characters (tab
    kept) removed, so a worker's output cannot move the cursor, rewrite the screen,
    retitle the window or hide a line from the client's terminal."""
    return _ESCAPES.sub("", text)


def forward_line(name: str, raw: bytes) -> None:
    """Write one line of a worker's stderr to the client's, as :func:`forward_lines` does."""
    text = printable(raw.decode("utf-8", "replace").rstrip("\n"))
    log.debug("[%s] %s", name, text)
    try:
        sys.stderr.write(f"[{name}] {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def forward_lines(name: str, lines: Iterable[bytes]) -> threading.Thread:
    """Copy a worker's stderr to the client's stderr, each line prefixed with ``[name]``
    and stripped of terminal control (:func:`printable`)."""

    def run() -> None:
        try:
            for raw in lines:
                forward_line(name, raw)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=run, name=f"skyward-stderr-{name}", daemon=True)
    thread.start()
    return thread


class LoopPipes(Channel):
    """A local agent's pipes, served by the one I/O loop (:mod:`skyward.io`): frames in,
    frames out and stderr lines, with no thread of their own."""

    def _serve(self, stderr_fd: int) -> None:
        self._stderr = skyio.LineReader(stderr_fd, lambda line: forward_line(self.name, line))
        self._frames: skyio.FrameReader | None = None
        self._writer: skyio.PipeWriter | None = None

    def attach(
        self,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        self._frames = skyio.FrameReader(self.reader.fileno(), on_frame, on_end)

    def open_writer(self, on_broken: Callable[[], object]) -> skyio.FrameSink:
        self._writer = skyio.PipeWriter(self.writer.fileno(), on_broken)
        return self._writer

    def _detach(self) -> None:
        # Off the loop before the pipes close: a closed descriptor's number is reused.
        self._stderr.detach(1)
        if self._writer is not None:
            self._writer.close()
        if self._frames is not None:
            self._frames.detach()


class PipeChannel(LoopPipes):
    """An agent running as a local subprocess, spoken to over its pipes."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            # Own session: a Ctrl-C at the terminal reaches the client, which tears down
            # the agents itself, instead of killing them mid-write.
            start_new_session=True,
        )
        assert self.process.stdin and self.process.stdout and self.process.stderr
        self.writer = self.process.stdin
        self.reader = self.process.stdout
        self._serve(self.process.stderr.fileno())

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def close(self, timeout: float = 2.0) -> None:
        try:
            self.writer.close()
        except (OSError, ValueError):
            pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._release()

    def kill(self) -> None:
        try:
            self.process.kill()
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not delivered
            pass
        self._release()

    def _release(self) -> None:
        self._detach()
        for stream in (self.writer, self.reader, self.process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):
                pass


AGENT_PID_MARK = b"skyward-agent-pid "
"""First stderr line of an SSH-started agent: the remote shell's pid, which ``exec`` keeps."""


class _ChannelIO(io.RawIOBase):
    """A paramiko channel's stdin/stdout as a raw binary stream (buffered by the caller)."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self._channel = channel

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._channel.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._channel.sendall(data)
        return len(data)


def _bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Whether ``fn`` finished within ``timeout``: paramiko calls can block forever on a
    silently dropped connection; the caller then closes the transport, which ends them."""
    return call_with_timeout(fn, timeout, name="skyward-ssh-bounded")[0]


class SSHChannel(Channel):
    """An agent started in an SSH exec channel: its stdin/stdout carry the frames.

    The agent's stderr is forwarded like a local agent's. ``kill`` kills the
    remote process group (when the connection still works) and then closes the
    SSH transport, so neither ``kill`` nor ``close`` can hang on a dead network;
    the agent also exits by itself when the connection goes, as its stdin ends.
    """

    def __init__(self, name: str, channel: paramiko.Channel) -> None:
        self.name = name
        self.channel = channel
        self._pid: int | None = None
        self._pid_seen = threading.Event()
        raw = _ChannelIO(channel)
        self.reader = io.BufferedReader(raw, 1 << 16)
        self.writer = raw  # type: ignore[assignment]  # Outbox coalesces writes already
        self._stderr = forward_lines(name, self._stderr_lines(channel.makefile_stderr("rb")))

    def attach(
        self,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        def run() -> None:
            reason = "its channel closed (agent process exited or connection lost)"
            try:
                while (frame := wire.read_frame(self.reader)) is not None:
                    on_frame(*frame)
            except Exception as exc:  # noqa: BLE001
                reason = f"reading from it failed: {type(exc).__name__}: {exc}"
            on_end(reason)

        threading.Thread(target=run, name=f"skyward-recv-{self.name}", daemon=True).start()

    def open_writer(self, on_broken: Callable[[], object]) -> skyio.FrameSink:
        return wire.Outbox(self.writer, on_broken, name=f"skyward-send-{self.name}")

    def _stderr_lines(self, stream: Iterable[bytes]) -> Iterator[bytes]:
        for line in stream:
            if self._pid is None and line.startswith(AGENT_PID_MARK):
                try:
                    pid = int(line[len(AGENT_PID_MARK) :])
                except ValueError:
                    pid = 0
                if pid > 1:  # 0, -1 and 1 would make a kill hit far more than the agent
                    self._pid = pid
                else:
                    yield line
                self._pid_seen.set()
                continue
            yield line
        self._pid_seen.set()

    @property
    def pid(self) -> int | None:
        """The agent's process id on the remote host, once announced."""
        return self._pid

    def started(self, timeout: float) -> bool:
        """Wait until the remote command announced the agent's pid (True) or ended (False)."""
        self._pid_seen.wait(timeout)
        return self._pid is not None

    def close(self, timeout: float = 2.0) -> None:
        def finish() -> None:
            self.channel.shutdown_write()  # EOF on the agent's stdin: it exits
            self.channel.status_event.wait(timeout)

        if _bounded(finish, timeout + 1.0) and self.channel.exit_status_ready():
            _bounded(self.channel.close, 2.0)
            self._release()
        else:
            self.kill()

    def kill(self) -> None:
        transport = self.channel.get_transport()
        pid = self._pid
        if pid is not None and transport is not None and transport.is_active():
            _bounded(lambda: _remote_kill(transport, pid), 3.0)
        if transport is not None:
            _bounded(transport.close, 5.0)
        self._release()

    def _release(self) -> None:
        self._stderr.join(1)
        try:
            self.reader.close()
        except (OSError, ValueError):
            pass


def _remote_kill(transport: paramiko.Transport, pid: int) -> None:
    if pid <= 1:
        # kill -9 -- -0 is the caller's group, -1 every process the user may signal.
        raise ValueError(f"refusing to kill remote pid {pid}: an agent's pid is > 1")
    session = transport.open_session(timeout=2.0)
    try:
        # The agent leads its own process group (sshd starts each session with setsid):
        # this also stops the process-executor slots.
        session.exec_command(f"kill -9 -- -{pid} {pid} 2>/dev/null")
        session.status_event.wait(2.0)
    finally:
        session.close()
