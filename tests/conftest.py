"""Shared test helpers.

Fixtures that need a system component (sshd, iptables, ...) call :func:`need`:
it skips locally when the component is missing and fails when ``CI=true``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import cloudpickle
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


def agent_processes(own: bool = False) -> list[psutil.Process]:
    """Running ``skyward.agent`` processes: all of this machine's, or with ``own`` only
    this test process's descendants (other test runs on the machine do not count)."""
    found = []
    candidates = (
        psutil.Process().children(recursive=True) if own else psutil.process_iter(["cmdline"])
    )
    for proc in candidates:
        try:
            cmdline = proc.cmdline()
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


@pytest.fixture(autouse=True, scope="session")
def _no_user_ssh_config() -> Iterator[None]:
    """Tests never read the real user's ~/.ssh/config: sky.SSH's default is a path that
    does not exist (tests that need a configuration pass ssh_config= explicitly)."""
    from skyward.providers import ssh_config

    saved = ssh_config.DEFAULT_SSH_CONFIG
    ssh_config.DEFAULT_SSH_CONFIG = "/nonexistent/skyward-tests/ssh_config"
    try:
        yield
    finally:
        ssh_config.DEFAULT_SSH_CONFIG = saved


@pytest.fixture(autouse=True, scope="module")
def _pickle_module_by_value(request: pytest.FixtureRequest) -> Iterator[None]:
    """Test modules that set ``PICKLE_BY_VALUE = True`` ship their functions by value:
    remote hosts' environments do not have the test modules, like a real remote host."""
    module = request.module
    if not getattr(module, "PICKLE_BY_VALUE", False):
        yield
        return
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture
def no_agents_left() -> Iterator[None]:
    """Assert that a test leaves none of its own agent processes behind (5 s grace)."""
    before = {p.pid for p in agent_processes(own=True)}
    yield
    left = lambda: {p.pid for p in agent_processes(own=True)} - before  # noqa: E731
    assert wait_until(lambda: not left(), 5.0), f"agent processes left running: {left()}"
