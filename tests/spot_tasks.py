"""Tasks of the spot tests (``test_spot.py`` on Local, ``test_aws_e2e.py`` over SSH)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def held(args: tuple[int, str]) -> tuple[int, int]:
    """Mark the start, then wait (bounded) until the test releases the tasks."""
    i, folder = args
    Path(folder, f"started-{i}").touch()
    deadline = time.monotonic() + 60
    while not Path(folder, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return i, os.getpid()


def at_once(args: tuple[str, int]) -> int:
    """Wait (bounded) until ``count`` tasks run at once; return this process's pid."""
    folder, count = args
    Path(folder, f"{os.getpid()}-{threading.get_ident()}").touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()
