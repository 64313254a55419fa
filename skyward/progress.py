"""A one-line progress display on the terminal: nodes starting, then (opt-in) tasks done,
counted as the user's tasks (:class:`TaskCounts`).

It draws only when stderr is a terminal; in a pipe, a log file or CI it stays
silent and the ``skyward`` logger carries the same information.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TextIO


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


RATE_WINDOW = 10.0


class TaskCounts:
    """The user's tasks, for the status line and ``stats()``: submitted, done, failed, and
    the total once it is known.

    A submitted callable may stand for several of the user's tasks (a joblib batch, a
    chunk of ``Compute.map``): its ``task_count`` attribute says how many. A producer
    that will submit more (a running ``Parallel`` call) registers with :meth:`follow`
    a callable giving how many tasks it will still submit, or ``None`` while it does
    not know yet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted = 0
        self.done = 0
        self.failed = 0
        self._producers: dict[object, Callable[[], int | None]] = {}
        self._first: float | None = None  # time of the first submit
        # (time, done) at each look, for the rate over the last RATE_WINDOW seconds.
        self._samples: deque[tuple[float, int]] = deque(maxlen=256)

    def add(self, fn: object, args: tuple[Any, ...] = ()) -> int:
        """Count the tasks of a call ``fn(*args)`` as submitted; return how many (for
        :meth:`finish`). ``fn.task_count`` is that number, or a function of ``args``."""
        count = getattr(fn, "task_count", 1)
        if callable(count):
            try:
                count = count(*args)
            except Exception:  # noqa: BLE001 - counting must never fail a submit
                count = 1
        count = count if isinstance(count, int) and count >= 0 else 1
        with self._lock:
            self.submitted += count
            if self._first is None:
                self._first = time.monotonic()
        return count

    def finish(self, count: int, future: Future[Any]) -> None:
        """``future`` (standing for ``count`` tasks) completed, failed or was cancelled."""
        failed = future.cancelled() or future.exception() is not None
        with self._lock:
            self.done += count
            if failed:
                self.failed += count

    def follow(self, key: object, remaining: Callable[[], int | None]) -> None:
        """``remaining()``: tasks a producer will still submit, ``None`` if not known yet."""
        with self._lock:
            self._producers[key] = remaining

    def unfollow(self, key: object) -> None:
        """The producer ``key`` submits no more."""
        with self._lock:
            self._producers.pop(key, None)

    def total(self) -> int | None:
        """Tasks in all, once every running producer knows its own; else ``None``."""
        with self._lock:
            submitted = self.submitted
            producers = list(self._producers.values())
        more = 0
        for remaining in producers:
            try:
                left = remaining()
            except Exception:  # noqa: BLE001 - a producer ending meanwhile: no estimate
                return None
            if left is None:
                return None
            more += max(left, 0)
        return submitted + more

    def snapshot(self) -> dict[str, Any]:
        """Counts, rate (tasks/s over the last ``RATE_WINDOW`` seconds, or since the first
        submit when that is shorter) and ETA (s, once the total is known)."""
        total = self.total()
        now = time.monotonic()
        with self._lock:
            done, failed, submitted = self.done, self.failed, self.submitted
            samples = self._samples
            samples.append((now, done))
            while now - samples[0][0] > RATE_WINDOW:
                samples.popleft()
            then, before = samples[0]
            if now - then >= 1.0:
                per_second = (done - before) / (now - then)
            else:
                per_second = done / max(now - self._first, 1e-9) if self._first else 0.0
        eta = None
        if total is not None and per_second > 0:
            eta = max(total - done, 0) / per_second
        return {
            "submitted": submitted,
            "done": done,
            "failed": failed,
            "total": total,
            "rate": per_second,
            "eta": eta,
        }

    def line(self) -> str:
        """``'120/400 tasks done, 2 failed (40.0/s, ETA 7s)'``; the total reads
        ``'232+'`` while a producer does not know its own yet."""
        counts = self.snapshot()
        total = counts["total"]
        if not counts["submitted"] and not total:
            return "no tasks yet"
        of = f"{total}" if total is not None else f"{counts['submitted']}+"
        text = f"{counts['done']}/{of} tasks done"
        if counts["failed"]:
            text += f", {counts['failed']} failed"
        text += f" ({counts['rate']:.1f}/s"
        if counts["eta"] is not None and counts["done"] < (total or 0):
            text += f", ETA {duration(counts['eta'])}"
        return text + ")"


def duration(seconds: float) -> str:
    """``'7s'``, ``'2m05s'``, ``'1h02m'``."""
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
