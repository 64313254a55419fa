"""How many CPUs a node offers its tasks, counted the way joblib's loky counts a machine's.

``cpu_count()`` mirrors ``loky.cpu_count()``: the smallest of ``os.cpu_count()``, the
process's CPU affinity, a cgroup CPU quota (containers) and ``LOKY_MAX_CPU_COUNT``.
``node_cpus()`` also honours ``SKYWARD_NODE_CPUS``, which the Local provider sets for
its agents: Local nodes share one machine, so each one gets its share of its CPUs.
Agents report ``node_cpus()`` in their HELLO; the joblib backend derives the default
BLAS/OpenMP threads per task from it, as loky does from ``cpu_count()``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["NODE_CPUS_ENV", "cpu_count", "node_cpus"]

NODE_CPUS_ENV = "SKYWARD_NODE_CPUS"


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def _cgroup_cpus() -> int | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) bandwidth limit."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    try:
        if v2.exists():
            parts = v2.read_text().split()
            quota, period = (parts[0], parts[1]) if len(parts) == 2 else ("max", "1")
        elif v1[0].exists() and v1[1].exists():
            quota, period = v1[0].read_text().strip(), v1[1].read_text().strip()
        else:
            return None
        if quota == "max" or int(quota) <= 0 or int(period) <= 0:
            return None
        return math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        return None


def cpu_count() -> int:
    """CPUs this process may use, as ``loky.cpu_count()`` counts them (at least 1)."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    for limit in (_cgroup_cpus(), _positive_int(os.environ.get("LOKY_MAX_CPU_COUNT"))):
        if limit is not None:
            counts.append(limit)
    return max(min(counts), 1)


def node_cpus() -> int:
    """CPUs of this node: :func:`cpu_count`, capped by ``SKYWARD_NODE_CPUS`` when set."""
    share = _positive_int(os.environ.get(NODE_CPUS_ENV))
    count = cpu_count()
    return min(count, share) if share is not None else count
