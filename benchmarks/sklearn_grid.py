"""``GridSearchCV`` over a large ``X``: Skyward's Local nodes against loky on the same cores.

One process per core on both sides: Skyward runs ``cores`` Local nodes x 1 slot
with the sklearn plugin, loky runs ``n_jobs=cores`` (joblib memory-maps the
large ``X`` for its workers). Both fit the same grid; results must agree. The
Skyward wall time includes sending ``X`` to every node (cluster start-up is
excluded: see the ``startup`` benchmark), and each timed Skyward run uses a
fresh cluster so ``X`` is never already cached. Workers are warmed up on a
small search first. Bytes per node come from ``compute.stats()``.
"""

from __future__ import annotations

import os
from typing import Any

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV
from sklearn.naive_bayes import GaussianNB

import skyward as sky
from benchmarks.common import Row, stopwatch

FOLDS = 5


def _data(rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, features))
    y = (X[:, :8].sum(axis=1) + rng.standard_normal(rows) > 0).astype(np.int64)
    return X, y


def _search(X: np.ndarray, y: np.ndarray, candidates: int) -> GridSearchCV:
    grid = {"var_smoothing": np.logspace(-12, -2, candidates)}
    return GridSearchCV(GaussianNB(), grid, cv=FOLDS, n_jobs=-1).fit(X, y)


def _loky(
    X: np.ndarray, y: np.ndarray, candidates: int, repeat: int, cores: int
) -> tuple[float, GridSearchCV]:
    best = float("inf")
    with joblib.parallel_config(backend="loky", n_jobs=cores):
        _search(*_data(2_000, 16), 2)  # warm-up: workers started, sklearn imported
        for _ in range(repeat):
            with stopwatch() as elapsed:
                search = _search(X, y, candidates)
            best = min(best, elapsed())
    return best, search


def _skyward(
    X: np.ndarray, y: np.ndarray, candidates: int, repeat: int, cores: int
) -> tuple[float, GridSearchCV, dict[str, Any]]:
    best, nodes = float("inf"), {}
    for _ in range(repeat):
        with sky.Compute(
            nodes=cores, worker=sky.Worker(concurrency=1), plugins=[sky.plugins.sklearn()]
        ) as compute:
            _search(*_data(2_000, 16), 2)  # warm-up: sklearn imported on every node
            before = compute.stats(refresh=True)["nodes"]
            with stopwatch() as elapsed:
                search = _search(X, y, candidates)
            after = compute.stats(refresh=True)["nodes"]
        if elapsed() < best:
            best = elapsed()
            nodes = {
                name: {k: after[name][k] - before[name][k] for k in ("bytes_sent", "tasks_done")}
                for name in after
            }
    return best, search, nodes


def run(quick: bool) -> list[Row]:
    """Wall time against loky and bytes sent per node relative to ``X``."""
    cores = os.cpu_count() or 2
    rows, features, candidates = (25_000, 256, 10) if quick else (50_000, 256, 20)
    repeat = 2 if quick else 3
    X, y = _data(rows, features)
    loky_wall, expected = _loky(X, y, candidates, repeat, cores)
    wall, got, nodes = _skyward(X, y, candidates, repeat, cores)
    assert got.best_params_ == expected.best_params_
    np.testing.assert_array_equal(
        got.cv_results_["mean_test_score"], expected.cv_results_["mean_test_score"]
    )
    per_node = max(n["bytes_sent"] for n in nodes.values()) / X.nbytes
    workload = (
        f"GridSearchCV(GaussianNB) X {X.nbytes / 1e6:.0f} MB, {candidates} x {FOLDS} fits, "
        f"{cores} cores"
    )
    system = f"skyward {cores} Local nodes x 1 slot"
    return [
        Row(
            workload,
            system,
            "wall",
            wall,
            "s",
            peer=f"loky n_jobs={cores}",
            ratio=wall / loky_wall,
            goal="<= 1.1x loky",
            met=wall <= 1.1 * loky_wall,
            extra={"nodes": nodes},
        ),
        Row(
            workload,
            system,
            "bytes sent per node / size(X)",
            per_node,
            "x",
            goal="<= 1.05",
            met=per_node <= 1.05,
            extra={"x_bytes": X.nbytes, "y_bytes": y.nbytes},
        ),
        Row(workload, f"loky n_jobs={cores}", "wall", loky_wall, "s"),
    ]
