"""The sklearn plugin: scikit-learn's ``n_jobs`` on Local agents gives loky's exact results.

Each equivalence test runs one scikit-learn call twice against one shared
2-node x 2-slot cluster: first under ``parallel_config(backend="loky",
n_jobs=2)`` (which overrides the plugin's backend in this thread), then on the
cluster. The cluster's task counters must grow during the second run only, so
the work verifiably ran on the agents.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.inspection import permutation_importance
from sklearn.model_selection import (
    GridSearchCV,
    RandomizedSearchCV,
    cross_val_score,
    cross_validate,
    learning_curve,
)
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

import skyward as sky
from skyward.plugins import compose_image, manager
from skyward_sklearn import SklearnPlugin, installed_version

pytestmark = pytest.mark.timeout(120)

X, Y = load_breast_cancer(return_X_y=True)
X = (X - X.mean(axis=0)) / X.std(axis=0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[sky.Compute]:
    with sky.Compute(
        nodes=2, worker=sky.Worker(concurrency=2), plugins=[sky.plugins.sklearn()]
    ) as compute:
        yield compute


def _agent_tasks(compute: sky.Compute) -> dict[str, int]:
    return {name: node["tasks_done"] for name, node in compute.stats(refresh=True)["nodes"].items()}


def loky_then_cluster(compute: sky.Compute, call: Callable[[], Any]) -> tuple[Any, Any]:
    """``call()`` under loky, then on the cluster; assert only the second ran on agents."""
    before = _agent_tasks(compute)
    with joblib.parallel_config(backend="loky", n_jobs=2):
        expected = call()
    assert _agent_tasks(compute) == before, "the loky run must not touch the cluster"
    got = call()
    after = _agent_tasks(compute)
    ran = {name: after[name] - before[name] for name in after}
    assert sum(ran.values()) > 0, f"no task ran on the agents: {ran}"
    return expected, got


def assert_same_search(expected: Any, got: Any) -> None:
    assert got.best_params_ == expected.best_params_
    assert got.best_score_ == expected.best_score_
    scores = [k for k in expected.cv_results_ if "score" in k and not k.endswith("time")]
    assert scores, "cv_results_ has no score arrays"
    for key in scores:
        np.testing.assert_array_equal(got.cv_results_[key], expected.cv_results_[key], key)
    np.testing.assert_array_equal(got.predict(X), expected.predict(X))


def test_grid_search_svc_matches_loky(cluster: sky.Compute) -> None:
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.01, 0.1]}
    expected, got = loky_then_cluster(
        cluster, lambda: GridSearchCV(SVC(), grid, cv=5, n_jobs=-1).fit(X, Y)
    )
    assert_same_search(expected, got)


def test_randomized_search_forest_matches_loky(cluster: sky.Compute) -> None:
    space = {"max_depth": [2, 3, 4, None], "min_samples_leaf": [1, 2, 4, 8]}

    def search() -> RandomizedSearchCV:
        forest = RandomForestClassifier(n_estimators=10, random_state=0)
        return RandomizedSearchCV(forest, space, n_iter=6, cv=3, random_state=0, n_jobs=-1).fit(
            X, Y
        )

    expected, got = loky_then_cluster(cluster, search)
    assert_same_search(expected, got)


def test_cross_val_score_matches_loky(cluster: sky.Compute) -> None:
    expected, got = loky_then_cluster(
        cluster, lambda: cross_val_score(SVC(C=0.5), X, Y, cv=5, n_jobs=-1)
    )
    np.testing.assert_array_equal(got, expected)


def test_cross_validate_matches_loky(cluster: sky.Compute) -> None:
    def run() -> dict[str, Any]:
        return cross_validate(
            DecisionTreeClassifier(random_state=0),
            X,
            Y,
            cv=4,
            n_jobs=-1,
            scoring=["accuracy", "f1"],
            return_train_score=True,
            return_estimator=True,
        )

    expected, got = loky_then_cluster(cluster, run)
    for key in ("test_accuracy", "test_f1", "train_accuracy", "train_f1"):
        np.testing.assert_array_equal(got[key], expected[key], key)
    for fitted, reference in zip(got["estimator"], expected["estimator"], strict=True):
        np.testing.assert_array_equal(fitted.predict(X), reference.predict(X))


def test_random_forest_fit_predict_matches_loky(cluster: sky.Compute) -> None:
    def fit() -> RandomForestClassifier:
        return RandomForestClassifier(n_estimators=24, random_state=0, n_jobs=-1).fit(X, Y)

    expected, got = loky_then_cluster(cluster, fit)
    np.testing.assert_array_equal(got.predict(X), expected.predict(X))
    np.testing.assert_array_equal(got.predict_proba(X), expected.predict_proba(X))
    np.testing.assert_array_equal(got.feature_importances_, expected.feature_importances_)


def test_permutation_importance_matches_loky(cluster: sky.Compute) -> None:
    model = DecisionTreeClassifier(max_depth=4, random_state=0).fit(X, Y)
    expected, got = loky_then_cluster(
        cluster,
        lambda: permutation_importance(model, X, Y, n_repeats=4, random_state=0, n_jobs=-1),
    )
    np.testing.assert_array_equal(got.importances, expected.importances)


def test_learning_curve_matches_loky(cluster: sky.Compute) -> None:
    def curve() -> tuple[Any, ...]:
        return tuple(learning_curve(SVC(), X, Y, cv=4, train_sizes=[0.3, 0.6, 1.0], n_jobs=-1))

    expected, got = loky_then_cluster(cluster, curve)
    for got_part, expected_part in zip(got, expected, strict=True):
        np.testing.assert_array_equal(got_part, expected_part)


class PidRecorder(ClassifierMixin, BaseEstimator):
    """Predicts the majority class and remembers the process that fitted it."""

    def __init__(self, tag: int = 0) -> None:
        self.tag = tag

    def fit(self, X: Any, y: Any) -> PidRecorder:
        self.classes_ = np.unique(y)
        self.majority_ = np.bincount(y).argmax()
        self.fitted_in_ = os.getpid()
        return self

    def predict(self, X: Any) -> Any:
        return np.full(len(X), self.majority_)


def test_fits_run_in_the_agent_processes(cluster: sky.Compute) -> None:
    result = cross_validate(PidRecorder(), X, Y, cv=8, n_jobs=-1, return_estimator=True)
    pids = {est.fitted_in_ for est in result["estimator"]}
    agents = {node.pid for node in cluster.nodes}
    assert pids <= agents and os.getpid() not in pids, (pids, agents)


def test_both_plugins_together_route_to_one_cluster() -> None:
    plugins = [sky.plugins.joblib(), sky.plugins.sklearn()]
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2), plugins=plugins) as compute:
        assert getattr(joblib.parallel.get_active_backend()[0], "compute", None) is compute
        scores = cross_val_score(SVC(), X, Y, cv=3, n_jobs=-1)
        assert compute.stats()["tasks"]["completed"] > 0
        requirements = compute.image.requirements()
    assert len(scores) == 3
    assert requirements["scikit-learn"] == f"scikit-learn=={installed_version('scikit-learn')}"
    assert requirements["joblib"] == f"joblib=={installed_version('joblib')}"
    # Leaving the cluster restores the backend that was active before it.
    assert getattr(joblib.parallel.get_active_backend()[0], "compute", None) is not compute


def _image(plugins: list[object], image: sky.Image | None = None) -> sky.Image:
    return compose_image(image or sky.Image(), manager(plugins), plugins)


def test_image_pins_client_versions_by_default() -> None:
    pip = set(_image([sky.plugins.sklearn()]).pip)
    numpy_major = int(np.__version__.split(".")[0])
    assert f"scikit-learn=={installed_version('scikit-learn')}" in pip
    assert f"joblib=={joblib.__version__}" in pip
    assert f"numpy>={numpy_major},<{numpy_major + 1}" in pip
    assert any(r.startswith("scipy>=") for r in pip)


def test_version_argument_pins_that_release() -> None:
    plugin = sky.plugins.sklearn(version="1.5.2")
    assert isinstance(plugin, SklearnPlugin)
    assert "scikit-learn==1.5.2" in _image([plugin]).pip
    with pytest.raises(ValueError, match="sklearn"):
        sky.plugins.sklearn(version="latest please")


def test_default_plugins_never_conflict_in_either_order() -> None:
    for plugins in (
        [sky.plugins.joblib(), sky.plugins.sklearn()],
        [sky.plugins.sklearn(), sky.plugins.joblib()],
    ):
        names = [r.split("=")[0].split(">")[0] for r in _image(plugins).pip]
        assert len(names) == len(set(names)), names


def test_user_pins_win_over_the_plugins_defaults() -> None:
    image = sky.Image(pip=["numpy==2.0.2", "joblib==1.4.2"])
    pip = _image([sky.plugins.sklearn()], image).pip
    assert "numpy==2.0.2" in pip and "joblib==1.4.2" in pip
    assert not any(r.startswith(("numpy>", "joblib==1.6")) for r in pip)


def test_conflicting_scikit_learn_pin_names_both_sides() -> None:
    image = sky.Image(pip=["scikit-learn==1.4.0"])
    with pytest.raises(sky.PinConflictError, match="scikit-learn.*sklearn"):
        _image([sky.plugins.sklearn(version="1.5.2")], image)
