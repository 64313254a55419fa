"""pytest plugin: run joblib's own test suite with ``"skyward"`` as joblib's default backend.

Loaded with ``-p skyward_default`` by ``tests/test_joblib_suite.py``. It starts one
Local ``Compute`` for the session and makes ``"skyward"`` joblib's process-wide
default backend the way the joblib plugin does (``activation.process_default``), so
every test that does not name a backend runs on the cluster. Tests parametrized with
loky, multiprocessing or threading run too: they check that those backends still
work while a cluster runs in the same process (forked pools included).

The module builds some parametrizations from joblib's backend registry, where
``"skyward"`` is registered here: those extra items, which name ``"skyward"``
explicitly (e.g. inside loky workers, where no cluster exists), are deselected, so
the items run are exactly stock joblib's.

The cluster has one single-slot node per core of this machine: the slot count is
then what loky's ``n_jobs=-1`` means here, which the thread-limit tests rely on
(they compute the expected BLAS threads from the default backend's ``n_jobs``).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from joblib import parallel

import skyward as sky
from skyward.agent.cpus import cpu_count
from skyward_joblib import SkywardBackend, activation

_stack = ExitStack()
_compute: sky.Compute | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _compute
    _compute = _stack.enter_context(
        sky.Compute(nodes=max(cpu_count(), 2), worker=sky.Worker(concurrency=1, executor="process"))
    )
    _stack.enter_context(activation.process_default(_compute))


def pytest_unconfigure(config: pytest.Config) -> None:
    _stack.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"joblib default backend: {parallel.DEFAULT_BACKEND} on {_compute!r}"]


# Tests that assert which class joblib's stock default backend is, not what a backend does.
STOCK_DEFAULT = {
    "test_backend_hinting_and_constraints": (
        "asserts that prefer='processes' swaps the default backend for LokyBackend; joblib "
        "keeps a default backend whose workers are already processes, as Skyward's are"
    ),
}

# Failures caused by the Skyward core, tracked there: strict, so a fix shows up as XPASS.
CORE_BUGS: dict[str, str] = {}


def _names_skyward(item: pytest.Item) -> bool:
    """A parametrization stock joblib does not have: "skyward" (or its class) named."""
    params = getattr(getattr(item, "callspec", None), "params", {}).values()
    return any(p == activation.BACKEND_NAME or isinstance(p, SkywardBackend) for p in params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    extra = [item for item in items if _names_skyward(item)]
    if extra:
        config.hook.pytest_deselected(items=extra)
        items[:] = [item for item in items if not _names_skyward(item)]
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in STOCK_DEFAULT:
            item.add_marker(pytest.mark.skip(reason=f"stock default: {STOCK_DEFAULT[name]}"))
        elif name in CORE_BUGS:
            item.add_marker(pytest.mark.xfail(reason=f"core: {CORE_BUGS[name]}", strict=True))
