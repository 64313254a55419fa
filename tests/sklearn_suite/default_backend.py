"""pytest plugin: every ``joblib.Parallel`` of the run uses one backend with ``n_jobs=-1``.

Loaded with ``-p default_backend`` by ``compare.py`` (``nox -s sklearn_suite``) to
run scikit-learn's own test suites in place. ``SKYWARD_SUITE_BACKEND`` picks the
backend: ``skyward`` (a Local ``Compute``, 2 nodes x 2 slots, with the sklearn
plugin; ``SKYWARD_SUITE_EXECUTOR`` picks the executor, ``thread`` by default) or
``loky``, the reference. Either way ``parallel_config(backend=...,
n_jobs=-1)`` becomes the default of every thread, so a search or a forest whose
``n_jobs`` is left at ``None`` really runs in parallel on that backend.
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack
from typing import Any

import pytest
from joblib import parallel, parallel_config

BACKENDS = ("skyward", "loky")
ENV = "SKYWARD_SUITE_BACKEND"

_stack = ExitStack()


def _process_wide(config: dict[str, Any]) -> None:
    """Make ``config`` joblib's configuration in every thread that did not set its own.

    joblib keeps it in a ``threading.local``; a class attribute of a subclass is the
    value each thread sees until it sets its own, as ``parallel_config`` does.
    """
    default = type("ProcessWideConfig", (threading.local,), {"config": config})()
    previous = parallel._backend
    parallel._backend = default
    _stack.callback(setattr, parallel, "_backend", previous)


def pytest_configure(config: pytest.Config) -> None:
    backend = os.environ.get(ENV, "")
    if backend not in BACKENDS:
        raise pytest.UsageError(f"set {ENV} to one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "skyward":
        import skyward as sky

        executor = os.environ.get("SKYWARD_SUITE_EXECUTOR", "thread")
        worker = sky.Worker(concurrency=2, executor=executor)  # type: ignore[arg-type]
        plugins = [sky.plugins.sklearn()]
        _stack.enter_context(sky.Compute(nodes=2, worker=worker, plugins=plugins))
    _stack.enter_context(parallel_config(backend=backend, n_jobs=-1))
    _process_wide(parallel._backend.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    _stack.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    backend, n_jobs = parallel.get_active_backend()
    return [f"joblib default: {type(backend).__name__}, n_jobs={n_jobs}"]
