"""A one-line progress display on the terminal: nodes starting, then (opt-in) tasks done.

It draws only when stderr is a terminal; in a pipe, a log file or CI it stays
silent and the ``skyward`` logger carries the same information.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """Redraws one status line on ``stream`` from a ``status()`` callback."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = _is_terminal(self.stream)
        self._status: Callable[[], str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0

    def show(self, status: Callable[[], str]) -> None:
        """Start (or switch to) redrawing ``status()`` every ``interval`` seconds."""
        if not self.enabled:
            return
        if self._status is not None and self._thread is not None:
            self._draw()  # the final state of the previous status keeps its line
            self._write("\n")
            self._width = 0
        self._status = status
        self._draw()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="skyward-progress", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Draw the last state, end the line and stop redrawing."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(2)
        self._thread = None
        self._draw()
        self._write("\n")
        self._width = 0
        self._status = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def _draw(self) -> None:
        if self._status is None:
            return
        try:
            line = f"skyward: {self._status()}"
        except Exception:  # noqa: BLE001 - a display must never break the run
            return
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self._write("\r" + line + " " * pad)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.enabled = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def rate(done: int, started: float) -> str:
    """``'123.4/s'`` since ``started`` (a ``time.monotonic()`` value)."""
    elapsed = max(time.monotonic() - started, 1e-9)
    return f"{done / elapsed:.1f}/s"
