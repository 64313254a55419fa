"""The SSH provider on 3 loopback sshd hosts against the Local provider, in the same run.

- start-up to the first result, cold (a fresh ``env_root``: venv creation and an
  offline install from a wheelhouse) and warm (the environment is reused);
- tiny-task throughput of ``compute.map`` (3 nodes x 1 slot), with and without
  ``chunksize``: both clusters up at once, rounds alternating between them, best of
  each (goal: SSH >= 0.8x Local without ``chunksize``);
- sleep efficiency: 0.25 s sleeps on 3 nodes x 25 slots (2000 tasks, 300 with
  ``--quick``). The ideal wall time is ``ceil(tasks / slots) x 0.25 s``: the
  shortest schedule whole tasks allow.

The hosts are the test suite's daemons (``tests/sshd_daemons.py``), everything
stays on loopback, and the wheelhouse is repacked from this interpreter.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import skyward as sky
from benchmarks.common import Row, efficiency_row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import sshd_daemons  # noqa: E402 - the test suite's loopback sshd hosts

NODES = 3
SLOTS = 25
SLEEP = 0.25
CHUNKSIZE = 64
ROUNDS = 5  # alternating SSH and Local; the first round of each warms up
THROUGHPUT_GOAL = 0.8


@contextmanager
def _ssh_setup() -> Iterator[tuple[sshd_daemons.SSHDCluster, str, str]]:
    with sshd_daemons.sshd_cluster() as cluster, sshd_daemons.repacked_wheelhouse() as wheels:
        root = tempfile.mkdtemp(prefix="skyward-bench-envs-")
        try:
            yield cluster, wheels, root
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _ssh(cluster: sshd_daemons.SSHDCluster, env_root: str) -> sky.SSH:
    return sky.SSH(
        cluster.specs(),
        key_filename=cluster.key_filename,
        known_hosts=cluster.known_hosts,
        python=sys.executable,
        env_root=env_root,
    )


def _startup(provider: Any, image: sky.Image) -> float:
    """Seconds from ``Compute`` entry to the first result."""
    started = time.perf_counter()
    with sky.Compute(provider, nodes=NODES, image=image) as compute:
        compute.submit(abs, -1).result()
        return time.perf_counter() - started


def _throughput(
    providers: dict[str, Any], image: sky.Image, tasks: int
) -> dict[str, dict[int, float]]:
    """Tasks per second of each provider's cluster, best of :data:`ROUNDS` rounds. Both
    clusters are up at once and the rounds alternate between them, so a burst of load
    on this machine (other processes) weighs on both sides of the ratio alike."""
    items = range(tasks)
    rates: dict[str, dict[int, float]] = {name: {} for name in providers}
    with ExitStack() as stack:
        clusters = {
            name: stack.enter_context(sky.Compute(provider, nodes=NODES, image=image))
            for name, provider in providers.items()
        }
        for chunksize in (1, CHUNKSIZE):
            best = dict.fromkeys(clusters, math.inf)
            for _ in range(ROUNDS):
                for name, compute in clusters.items():
                    started = time.perf_counter()
                    assert sum(compute.map(abs, items, chunksize=chunksize)) == sum(items)
                    best[name] = min(best[name], time.perf_counter() - started)
            for name in clusters:
                rates[name][chunksize] = tasks / best[name]
    return rates


def _efficiency(provider: Any, image: sky.Image, tasks: int) -> float:
    worker = sky.Worker(concurrency=SLOTS)
    with sky.Compute(provider, nodes=NODES, worker=worker, image=image) as compute:
        compute.submit(abs, 1).result()
        started = time.perf_counter()
        futures = [compute.submit(time.sleep, SLEEP) for _ in range(tasks)]
        for future in futures:
            future.result()
        wall = time.perf_counter() - started
        ideal = math.ceil(tasks / compute.total_slots) * SLEEP
    return ideal / wall


def run(quick: bool) -> list[Row]:
    """Start-up (cold, warm), throughput and sleep efficiency over SSH vs Local."""
    tiny = 3_000 if quick else 20_000
    sleeps = 300 if quick else 2000
    local = sky.Local()
    rows: list[Row] = []
    with _ssh_setup() as (cluster, wheelhouse, root):
        image = sky.Image(wheelhouse=wheelhouse)
        cold = _startup(_ssh(cluster, tempfile.mkdtemp(dir=root)), image)
        ssh = _ssh(cluster, root)
        _startup(ssh, image)  # fills this env_root
        warm = min(_startup(ssh, image) for _ in range(3))
        here = min(_startup(local, image) for _ in range(3))
        rates = _throughput({"ssh": ssh, "local": local}, image, tiny)
        ssh_rates, local_rates = rates["ssh"], rates["local"]
        ssh_eff = _efficiency(ssh, image, sleeps)
        local_eff = _efficiency(local, image, sleeps)

    hosts = f"SSH {NODES} hosts"
    startup = f"start-up to first result, {NODES} nodes"
    for label, value in (("cold", cold), ("warm", warm)):
        goal = "<= 2 s" if label == "warm" else None
        rows.append(
            Row(
                startup,
                f"skyward {hosts} ({label})",
                "seconds",
                value,
                "s",
                peer=f"Local {NODES} nodes",
                ratio=value / here,
                goal=goal,
                met=(value <= 2.0) if goal else None,
            )
        )
    rows.append(Row(startup, "skyward Local", "seconds", here, "s"))
    for chunksize in (1, CHUNKSIZE):
        workload = f"throughput map {tiny} no-ops chunksize={chunksize}, {NODES} nodes x 1 slot"
        ratio = ssh_rates[chunksize] / local_rates[chunksize]
        goal = f">= {THROUGHPUT_GOAL}x Local" if chunksize == 1 else None
        rows.append(
            Row(
                workload,
                f"skyward {hosts}",
                "tasks/s",
                ssh_rates[chunksize],
                "tasks/s",
                peer="Local",
                ratio=ratio,
                goal=goal,
                met=(ratio >= THROUGHPUT_GOAL) if goal else None,
            )
        )
        rows.append(Row(workload, "skyward Local", "tasks/s", local_rates[chunksize], "tasks/s"))
    workload = f"sleep efficiency {sleeps} x {SLEEP}s, {NODES} nodes x {SLOTS} slots"
    for system, eff in ((f"skyward {hosts}", ssh_eff), ("skyward Local", local_eff)):
        rows.append(
            efficiency_row(
                workload,
                system,
                eff,
                extra={"vs Local": ssh_eff / local_eff} if system != "skyward Local" else {},
            )
        )
    return rows
