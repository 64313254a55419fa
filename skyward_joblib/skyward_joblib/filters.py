"""Warning filters that a worker can unpickle.

scikit-learn's ``Parallel`` copies ``warnings.filters`` into every task. A filter
whose category class lives in a package the worker lacks (pytest, a cloud SDK, a
monitoring agent) makes the whole task fail to unpickle there. Categories from
the standard library are always importable, so those filters are kept.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["from_stdlib", "worker_safe"]


def from_stdlib(category: type) -> bool:
    """Whether ``category`` is defined by Python itself (builtins or a stdlib module)."""
    module = getattr(category, "__module__", None) or ""
    return module.split(".")[0] in sys.stdlib_module_names


def worker_safe(filters: Iterable[Any]) -> list[Any]:
    """The filters whose category class comes from the standard library, in order."""
    return [f for f in filters if from_stdlib(f[2])]
