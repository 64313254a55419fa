"""Elastic start (``Compute(min_nodes=...)``): the block is entered once ``min_nodes`` are
up, the other nodes join while it runs and take work (issue 16)."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import psutil
import pytest
from conftest import wait_until
from sshd_daemons import PORT, SSHDCluster, _listening, sshd_cluster, start_sshd, stop_sshd
from sshd_hosts import SSHD, bootstrapped_agents

import skyward as sky
from skyward.channel import Channel
from skyward.errors import NodeStartError
from skyward.providers import ClusterSpec, Launcher, Provider
from skyward.providers.local import Local

pytestmark = pytest.mark.timeout(120)

PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


@dataclass
class GatedLauncher(Launcher):
    """A local node whose start waits for ``gate`` and fails its first ``failures`` times."""

    inner: Launcher
    gate: threading.Event
    failures: int = 0
    attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.name = self.inner.name

    def open(self) -> Channel:
        self.attempts += 1
        if not self.gate.wait(60):
            raise NodeStartError(f"{self.name}: the test never opened the gate")
        if self.attempts <= self.failures:
            raise NodeStartError(f"{self.name}: refused (attempt {self.attempts}, test)")
        return self.inner.open()


@dataclass(frozen=True, eq=False)
class Gated(Provider):
    """``sky.Local()`` whose nodes from ``first_late`` on are :class:`GatedLauncher` s."""

    first_late: int
    gate: threading.Event
    failures: int = 0
    launchers: list[Launcher] = field(default_factory=list)

    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        inner = Local().launch(spec, cleanup)
        self.launchers[:] = [
            launcher if i < self.first_late else GatedLauncher(launcher, self.gate, self.failures)
            for i, launcher in enumerate(inner)
        ]
        return self.launchers


def pid_after(_: int) -> int:
    return os.getpid()


def test_block_is_entered_with_min_nodes_and_late_nodes_join_and_take_work(
    no_agents_left: None,
) -> None:
    gate = threading.Event()
    provider = Gated(first_late=1, gate=gate)
    plugins = [sky.plugins.joblib()]
    with sky.Compute(
        provider, nodes=3, min_nodes=1, worker=sky.Worker(2), plugins=plugins
    ) as compute:
        # Entered while two of the three starts wait at the gate.
        assert [launcher.attempts for launcher in provider.launchers[1:]] == [1, 1]
        assert compute.total_slots == 2
        with joblib.parallel_config(backend="skyward"):
            assert joblib.Parallel(n_jobs=-1)._effective_n_jobs() == 2
        queued = [compute.submit(pid_after, i) for i in range(6)]
        gate.set()
        assert wait_until(lambda: compute.total_slots == 6, 30), compute
        with joblib.parallel_config(backend="skyward"):
            assert joblib.Parallel(n_jobs=-1)._effective_n_jobs() == 6
        assert len({f.result(30) for f in queued}) >= 1
        pids = {n.pid for n in compute.nodes}
        assert len(pids) == 3
        ran = set(compute.map(_busy_pid, [0.3] * 12))
        assert ran == pids  # the late nodes take work


def _busy_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_a_late_node_that_fails_to_start_is_retried_within_restarts(no_agents_left: None) -> None:
    gate = threading.Event()
    gate.set()
    provider = Gated(first_late=1, gate=gate, failures=2)
    with sky.Compute(provider, nodes=2, min_nodes=1, restarts=3) as compute:
        assert wait_until(lambda: compute.total_slots == 2, 30), compute
        assert provider.launchers[1].attempts == 3  # type: ignore[attr-defined]


def test_a_late_node_that_never_starts_does_not_fail_the_block(
    no_agents_left: None, caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    gate.set()
    provider = Gated(first_late=1, gate=gate, failures=100)
    with sky.Compute(provider, nodes=2, min_nodes=1, restarts=1) as compute:
        assert wait_until(lambda: "giving up (restarts=1)" in caplog.text, 30)
        assert list(compute.map(abs, [-1, -2])) == [1, 2]
        assert compute.total_slots == 1
    assert provider.launchers[1].attempts == 2  # type: ignore[attr-defined]


def test_too_few_nodes_to_reach_min_nodes_fails_the_start(no_agents_left: None) -> None:
    gate = threading.Event()
    gate.set()
    provider = Gated(first_late=1, gate=gate, failures=100)
    with pytest.raises(NodeStartError, match="node-1: refused"):
        with sky.Compute(provider, nodes=2, min_nodes=2):
            pytest.fail("the cluster must not start")


@pytest.mark.parametrize("min_nodes", [0, 3, 1.5])
def test_min_nodes_out_of_range_is_refused(min_nodes: object) -> None:
    with pytest.raises((ValueError, TypeError), match="min_nodes"):
        sky.Compute(nodes=2, min_nodes=min_nodes)  # type: ignore[arg-type]


# --- over SSH: the third host's sshd is down at start and comes up later ---------------------

LATE_ADDRESSES = ("127.0.0.5", "127.0.0.6", "127.0.0.7")


@pytest.fixture
def late_cluster() -> Iterator[SSHDCluster]:
    """Three daemons of their own (the session's stay up for the other tests)."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd is not available")
    with sshd_cluster(LATE_ADDRESSES) as cluster:
        yield cluster


def together(args: tuple[str, int]) -> int:
    """Wait (bounded) until ``count`` tasks run at once in different processes."""
    folder, count = args
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 30
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid() if len(os.listdir(folder)) >= count else -1


def test_ssh_host_down_at_start_joins_when_its_sshd_comes_up(
    late_cluster: SSHDCluster, ssh_env_root: str, ssh_wheelhouse: str
) -> None:
    third = late_cluster.hosts[2]
    workdir = Path(late_cluster.workdir)
    psutil.Process(third.pid).terminate()
    assert wait_until(lambda: not _listening(third.address, PORT), 10)
    entered = threading.Event()
    third_up = threading.Event()
    restarted: list[object] = []

    def bring_up() -> None:
        entered.wait(8)  # 8 s after the start at most, at once once the block is entered
        restarted.append(
            start_sshd(
                third.address,
                PORT,
                Path(third.host_key_file),
                workdir / "authorized_keys",
                workdir,
            )
        )
        third_up.set()

    before = {p.pid for p in bootstrapped_agents()}
    provider = sky.SSH(
        late_cluster.specs(),
        key_filename=late_cluster.key_filename,
        known_hosts=late_cluster.known_hosts,
        python=sys.executable,
        env_root=ssh_env_root,
        connect_timeout=30.0,
    )
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)
    # Warm the hosts' shared environment first, so 8 s is about the start, not the install.
    with sky.Compute(provider, nodes=1, image=image) as warm:
        assert warm.submit(abs, -1).result(60) == 1
    thread = threading.Thread(target=bring_up, daemon=True)
    try:
        thread.start()
        with sky.Compute(
            provider, nodes=3, min_nodes=2, worker=sky.Worker(1), image=image
        ) as compute:
            assert not third_up.is_set()  # entered before the third host was up
            entered.set()
            assert compute.total_slots == 2
            with tempfile.TemporaryDirectory() as two:
                futures = [compute.submit(together, (two, 2)) for _ in range(2)]
                pids = {f.result(40) for f in futures}
            assert len(pids) == 2 and -1 not in pids  # two nodes at once
            assert wait_until(lambda: compute.total_slots == 3, 40), compute
            with tempfile.TemporaryDirectory() as three:
                futures = [compute.submit(together, (three, 3)) for _ in range(3)]
                pids = {f.result(40) for f in futures}
            assert len(pids) == 3 and -1 not in pids  # the third node took work
    finally:
        thread.join(15)
        for proc in restarted:
            daemon = psutil.Process(proc.pid)  # type: ignore[attr-defined]
            assert wait_until(lambda d=daemon: not d.children(recursive=True), 5)
            stop_sshd(proc)  # type: ignore[arg-type]
    assert wait_until(lambda: not ({p.pid for p in bootstrapped_agents()} - before), 5.0)
    assert wait_until(lambda: not late_cluster.sessions(), 5.0)


def _slow_on(args: tuple[int, str]) -> int:
    """Mark the start, then hang on process ``slow``; return at once elsewhere."""
    slow, folder = args
    Path(folder, str(os.getpid())).touch()
    if os.getpid() == slow:
        time.sleep(60)
    return os.getpid()


def test_work_waits_for_a_late_node_when_the_only_live_node_is_lost(
    no_agents_left: None, tmp_path: Path
) -> None:
    gate = threading.Event()
    provider = Gated(first_late=1, gate=gate)
    with sky.Compute(provider, nodes=2, min_nodes=1, restarts=0) as compute:
        (first,) = compute.nodes
        assert first.pid is not None
        future = compute.submit(_slow_on, (first.pid, str(tmp_path)))
        assert wait_until(lambda: (tmp_path / str(first.pid)).exists(), 30)
        os.kill(first.pid, signal.SIGKILL)
        assert wait_until(lambda: not first.alive, 30)
        # No live node and no restart: the task waits for the node still starting.
        later = compute.submit(abs, -5)
        assert not future.done() and not later.done()
        gate.set()
        assert later.result(30) == 5
        assert future.result(30) not in (first.pid, -1)
