"""Scale: how many slots one client drives. Sleep tasks on many nodes x 20 slots.

Local nodes up to 250 (5,000 slots, 50,000 tasks), and 32 SSH nodes: 32
connections spread over the loopback test sshd hosts, each with its own agent.
Goals (issue 15): >= 98 % at 2,000 slots, >= 97 % at 5,000, >= 97 % for 32 SSH
nodes. Each point runs ten tasks per slot; the machine's load average before
each point is recorded with it (on a shared machine it explains outliers).

Efficiency is the ideal wall time (tasks x duration / slots) over the measured
one, from the first submit to the last result (start-up is measured apart).
Client CPU per task is the client process's CPU time (all its threads) over
the tasks dispatched. ``run`` gives one row per cluster size: the scaling curve.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import skyward as sky
from benchmarks.common import Row, efficiency_row

SLOTS_PER_NODE = 20
DURATION = 0.5


def goal(slots: int, ssh: bool) -> float | None:
    """The efficiency a point must reach (issue 15), ``None`` below 2,000 Local slots."""
    if ssh:
        return 0.97
    if slots >= 5000:
        return 0.97
    return 0.98 if slots >= 2000 else None


def measure(nodes: int, tasks: int, provider: Any = None, **compute: Any) -> Row:
    """Run ``tasks`` sleeps on ``nodes`` x 20 slots; one row with efficiency and client CPU."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    worker = sky.Worker(concurrency=SLOTS_PER_NODE)
    with sky.Compute(provider, nodes=nodes, worker=worker, **compute) as cluster:
        startup = time.perf_counter() - started
        slots = cluster.total_slots
        cpu0, wall0 = time.process_time(), time.perf_counter()
        futures = [cluster.submit(time.sleep, DURATION) for _ in range(tasks)]
        for future in futures:
            future.result()
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    ideal = tasks * DURATION / slots
    efficiency = ideal / wall
    return efficiency_row(
        f"scale {nodes} nodes x {SLOTS_PER_NODE} slots, {tasks} x {DURATION}s",
        f"skyward {type(cluster.provider).__name__}",
        efficiency,
        goal=goal(slots, ssh=provider is not None and not isinstance(provider, sky.Local)),
        extra={
            "slots": slots,
            "wall_s": round(wall, 3),
            "ideal_s": ideal,
            "startup_s": round(startup, 2),
            "client_cpu_us_per_task": round(cpu / tasks * 1e6, 1),
            "load_before": round(load, 1),
        },
    )


def measure_ssh(nodes: int, tasks: int) -> Row:
    """The same on ``nodes`` SSH connections to the loopback test daemons."""
    from benchmarks.ssh import _ssh_setup

    with _ssh_setup() as (cluster, wheels, env_root):
        hosts = cluster.specs()
        provider = sky.SSH(
            [hosts[i % len(hosts)] for i in range(nodes)],
            key_filename=cluster.key_filename,
            known_hosts=cluster.known_hosts,
            python=sys.executable,
            env_root=env_root,
        )
        return measure(nodes, tasks, provider, image=sky.Image(wheelhouse=wheels))


def run(quick: bool) -> list[Row]:
    """The scaling curve: slots vs efficiency (full: up to 250 nodes = 5,000 slots)."""
    sizes = [5, 20] if quick else [5, 25, 50, 100, 150, 250]
    measures = [(n, measure) for n in sizes] + [(8 if quick else 32, measure_ssh)]
    rows = []
    for nodes, run_one in measures:
        row = run_one(nodes, nodes * SLOTS_PER_NODE * 10)
        print(
            f"  {row.extra['slots']:5d} slots: efficiency {row.value:.1f} %, wall "
            f"{row.extra['wall_s']}s (ideal {row.extra['ideal_s']}s), start-up "
            f"{row.extra['startup_s']}s, client CPU {row.extra['client_cpu_us_per_task']} us/task"
            f" (load {row.extra['load_before']})",
            flush=True,
        )
        rows.append(row)
    return rows
