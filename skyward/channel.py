"""Byte-stream channels to a running agent.

A channel is where frames travel: the agent's stdin (``writer``) and stdout
(``reader``), plus its stderr, forwarded line by line to the client's stderr
with the node's name in front. Every provider produces channels; everything
above this module (nodes, scheduler, Compute) is the same for all of them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import IO

log = logging.getLogger("skyward.worker")


class Channel(ABC):
    """A started agent and the byte streams that reach it."""

    name: str
    reader: IO[bytes]
    writer: IO[bytes]

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


def forward_lines(name: str, lines: Iterable[bytes]) -> threading.Thread:
    """Copy a worker's stderr to the client's stderr, each line prefixed with ``[name]``."""

    def run() -> None:
        try:
            for raw in lines:
                text = raw.decode("utf-8", "replace").rstrip("\n")
                log.debug("[%s] %s", name, text)
                try:
                    sys.stderr.write(f"[{name}] {text}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=run, name=f"skyward-stderr-{name}", daemon=True)
    thread.start()
    return thread


class PipeChannel(Channel):
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
        self._stderr = forward_lines(name, self.process.stderr)

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
        self._stderr.join(1)
        for stream in (self.writer, self.reader, self.process.stderr):
            try:
                if stream is not None:
                    stream.close()
            except (OSError, ValueError):
                pass
