"""The bounded-wait helpers: every loop ends, every call is waited for at most its timeout."""

from __future__ import annotations

import threading
import time

import pytest

from skyward.waits import call_with_timeout, retries

pytestmark = pytest.mark.timeout(30)


def test_retries_tries_once_more_at_the_deadline_then_ends() -> None:
    assert list(retries(time.monotonic() - 1, 0.01)) == [0.0]  # already late: one last try
    tries = list(retries(time.monotonic() + 0.2, 0.05))
    assert 2 <= len(tries) <= 6 and tries[-1] == 0.0


def test_retries_ends_as_soon_as_stop_is_set() -> None:
    stop = threading.Event()
    seen = []
    for left in retries(time.monotonic() + 60, 30, stop=stop):
        seen.append(left)
        threading.Timer(0.05, stop.set).start()  # wakes the 30 s pause
    assert len(seen) == 1


def test_call_with_timeout_reports_a_stuck_call_and_hands_over_errors() -> None:
    release = threading.Event()
    try:
        assert call_with_timeout(release.wait, 0.1) == (False, None)
    finally:
        release.set()
    finished, error = call_with_timeout(lambda: 1 / 0, 5)
    assert finished and isinstance(error, ZeroDivisionError)
