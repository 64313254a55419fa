"""Bounded waits: a call on a helper thread with a timeout, and retries until a deadline.

Nothing in Skyward may wait forever. Calls that can block without end (paramiko on a
silently dropped connection) run through :func:`call_with_timeout`; loops that try
again until something is ready (an instance running, a port open) iterate
:func:`retries`, which bounds them in time and in count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

__all__ = ["call_with_timeout", "retries"]


def call_with_timeout(
    fn: Callable[[], object],
    timeout: float,
    *,
    name: str = "skyward-bounded",
    on_interrupt: Callable[[], None] | None = None,
) -> tuple[bool, BaseException | None]:
    """Run ``fn`` on a daemon thread and wait up to ``timeout`` seconds for it.

    Returns ``(finished, error)``: whether ``fn`` returned or raised in time, and what
    it raised. A call still running at the timeout is left to its thread; the caller
    ends it (e.g. by closing the transport the call is stuck on). With ``on_interrupt``,
    a Ctrl-C or SIGTERM while waiting calls it and the wait goes on: for work, such as
    a teardown, that must not be cut short.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    deadline = time.monotonic() + timeout
    try:
        thread.start()
    except (KeyboardInterrupt, SystemExit):
        if on_interrupt is None:
            raise
        on_interrupt()  # start() was waiting for the thread to begin: it runs anyway
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            thread.join(min(1.0, left))
        except (KeyboardInterrupt, SystemExit):
            if on_interrupt is None:
                raise
            on_interrupt()
    finished = not thread.is_alive()
    return finished, errors[0] if finished and errors else None


def retries(
    deadline: float, interval: float, stop: threading.Event | None = None
) -> Iterator[float]:
    """Yield the seconds left until ``deadline`` (a ``time.monotonic()`` value): at once,
    then every ``interval`` seconds, and a last time at the deadline; end after that, or
    as soon as ``stop`` is set.

    ``for left in retries(...)`` runs its body at least once (unless ``stop`` is set);
    the code after the loop handles the timeout.
    """
    if not interval > 0:
        raise ValueError(f"retries(interval={interval!r}) must be > 0")
    while stop is None or not stop.is_set():
        left = deadline - time.monotonic()
        yield max(0.0, left)
        if left <= 0:
            return
        pause = min(interval, max(0.0, deadline - time.monotonic()))
        if stop is None:
            time.sleep(pause)
        else:
            stop.wait(pause)
