"""Which running tasks are stragglers: the run-time statistics behind ``speculate=True``.

A task is a straggler once it has run :data:`FACTOR` times the median of the
finished tasks of its group (one call), and :data:`MIN_SECONDS` at least, with
:data:`SAMPLES` finished tasks to take the median of. The scheduler starts a
second copy of each on another node (see :meth:`Scheduler.speculate_stragglers`).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from skyward.tasks import TaskRecord

FACTOR = 3.0
MIN_SECONDS = 2.0
SAMPLES = 3
_GROUPS = 64  # groups remembered (the most recent ones)
_RUNS = 256  # run times kept per group


class Stragglers:
    """Run times of finished tasks, by group (callers hold the scheduler's lock)."""

    def __init__(self) -> None:
        self._durations: dict[object, deque[float]] = {}

    def ran(self, record: TaskRecord, now: float) -> None:
        """Note ``record``'s run time, ended at ``now``, for its group's median."""
        durations = self._durations.pop(record.group, None) or deque(maxlen=_RUNS)
        durations.append(now - record.started)
        self._durations[record.group] = durations  # most recent group last
        if len(self._durations) > _GROUPS:
            del self._durations[next(iter(self._durations))]

    def median_if_late(self, record: TaskRecord, now: float) -> float | None:
        """The median of ``record``'s group if ``record`` is a straggler at ``now``, else None."""
        durations = self._durations.get(record.group)
        if durations is None or len(durations) < SAMPLES:
            return None
        median = statistics.median(durations)
        if now - record.started < max(FACTOR * median, MIN_SECONDS):
            return None
        return median
