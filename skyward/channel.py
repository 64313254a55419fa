"""Byte-stream channels to a running agent.

A channel is where frames travel: the agent's stdin and stdout, plus its stderr,
forwarded line by line to the client's stderr with the node's name in front. Every
provider produces channels; everything above this module (nodes, scheduler, Compute)
is the same for all of them. Every channel, a local agent's pipes and an SSH exec
channel alike, is served by the client's one I/O loop (:mod:`skyward.io`,
:mod:`skyward.sshio`): no thread per node.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from skyward import io as skyio
from skyward import sshio, wire
from skyward.waits import call_with_timeout

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("skyward.worker")


class Channel(ABC):
    """A started agent and the byte streams that reach it."""

    name: str

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
    """Write one line of a worker's stderr to the client's, prefixed with ``[name]`` and
    stripped of terminal control (:func:`printable`)."""
    text = printable(raw.decode("utf-8", "replace").rstrip("\n"))
    log.debug("[%s] %s", name, text)
    try:
        sys.stderr.write(f"[{name}] {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class LoopPipes(Channel):
    """A local agent's pipes, served by the one I/O loop (:mod:`skyward.io`): frames in,
    frames out and stderr lines, with no thread of their own."""

    reader: IO[bytes]
    writer: IO[bytes]

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
        self._writer: skyio.FrameSink | None = None
        channel.settimeout(0.0)  # read and written on the loop only when ready: never wait
        self._reader = sshio.ChannelReader(channel, self._stderr_line, self._pid_seen.set)

    def attach(
        self,
        on_frame: Callable[[wire.Kind, bytes, int], object],
        on_end: Callable[[str], object],
    ) -> None:
        self._reader.attach(on_frame, on_end)

    def open_writer(self, on_broken: Callable[[], object]) -> skyio.FrameSink:
        self._writer = sshio.ChannelWriter(self.channel, on_broken)
        return self._writer

    def _stderr_line(self, line: bytes) -> None:
        if self._pid is None and not self._pid_seen.is_set() and line.startswith(AGENT_PID_MARK):
            try:
                pid = int(line[len(AGENT_PID_MARK) :])
            except ValueError:
                pid = 0
            self._pid_seen.set()
            if pid > 1:  # 0, -1 and 1 would make a kill hit far more than the agent
                self._pid = pid
                return
        forward_line(self.name, line)

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
        if self._writer is not None:
            self._writer.close()
        self._reader.detach(1)
        _bounded(self.channel.close, 2.0)  # after detach: this closes the pipe the loop watched


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
