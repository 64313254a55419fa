"""A client thread that serializes and sends joblib batches.

joblib calls ``backend.submit`` while holding its ``Parallel`` lock, from the
thread that delivered the previous result. Pickling a batch there would hold
up every other result; instead ``submit`` queues the batch and this thread
pickles and sends it, one at a time, in order (as loky's queue feeder does).
It stops after a second without work and starts again on demand.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

IDLE_SECONDS = 1.0


class Feeder:
    """Runs queued calls in FIFO order on one daemon thread."""

    def __init__(self, name: str = "skyward-joblib-feeder") -> None:
        self._name = name
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """In a forked child: the parent's queued calls and thread are not the child's."""
        self._calls = deque()
        self._ready = threading.Condition()  # the parent's feeder thread may have held it
        self._thread = None

    def put(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; ``fn`` must handle its own errors."""
        with self._ready:
            self._calls.append((fn, args))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                if not self._calls:
                    self._ready.wait(IDLE_SECONDS)
                if not self._calls:
                    self._thread = None
                    return
                fn, args = self._calls.popleft()
            fn(*args)


feeder = Feeder()
os.register_at_fork(after_in_child=feeder.reset)
