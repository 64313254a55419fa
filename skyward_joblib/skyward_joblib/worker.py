"""What runs inside the agent: the batch wrapper and agent detection.

A joblib batch reaches the worker wrapped in :class:`RemoteBatch`. Unpickling it
imports this package, which registers the ``"skyward"`` backend name there too,
so a ``Parallel(backend="skyward")`` written inside a task resolves, and
:func:`in_agent` makes it fall back to a local backend on the worker's own cores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from skyward_joblib import threads

_in_agent = False


def in_agent() -> bool:
    """Whether this process is a Skyward agent (or a slot process of one)."""
    if _in_agent:
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) in ("skyward.agent", "skyward.agent.__main__")


class RemoteBatch:
    """A joblib batch as shipped to a worker: runs it under its call's thread variables.

    ``thread_env`` comes from :func:`skyward_joblib.threads.task_env`, computed on the
    client when the ``Parallel`` call started.
    """

    __slots__ = ("batch", "thread_env")

    def __init__(self, batch: Callable[[], list[Any]], thread_env: dict[str, str]) -> None:
        self.batch = batch
        self.thread_env = thread_env

    def __getstate__(self) -> tuple[Callable[[], list[Any]], dict[str, str]]:
        return self.batch, self.thread_env

    def __setstate__(self, state: tuple[Callable[[], list[Any]], dict[str, str]]) -> None:
        self.batch, self.thread_env = state

    def __len__(self) -> int:
        return len(self.batch) if hasattr(self.batch, "__len__") else 1

    @property
    def task_count(self) -> int:
        """The user's tasks in this batch: what the Compute's progress counts."""
        return len(self)

    def __call__(self) -> list[Any]:
        global _in_agent
        _in_agent = True
        with threads.thread_limits.limit(self.thread_env):
            return self.batch()
