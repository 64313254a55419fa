"""Shared test helpers.

Fixtures that need a system component (sshd, iptables, ...) call :func:`need`:
it skips locally when the component is missing and fails when ``CI=true``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

pytest_plugins = ["sshd_hosts"]

IN_CI = os.environ.get("CI") == "true"


def need(available: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when a system component is missing."""
    if available:
        return
    message = f"{what} is not available on this machine"
    if IN_CI:
        pytest.fail(message + " (CI=true: .ci/run must install it)")
    pytest.skip(message)


def agent_processes() -> list[psutil.Process]:
    """Every running ``skyward.agent`` process on this machine (any user, any parent)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "skyward.agent" in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.02) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds pass (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture
def no_agents_left() -> Iterator[None]:
    """Assert that a test leaves no agent process behind (5 s grace)."""
    before = {p.pid for p in agent_processes()}
    yield
    assert wait_until(lambda: not ({p.pid for p in agent_processes()} - before), 5.0), (
        f"agent processes left running: {[p.pid for p in agent_processes()]}"
    )
