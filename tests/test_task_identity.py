"""Issue 12, row 12: objects shared by a task's function and its arguments stay one object.

loky pickles a task (function, closure, globals, arguments) in one pickle, so
``argument is captured`` holds in the worker. Skyward ships functions pickled by
value apart from the arguments, deduplicated by content; that must never split
an object the two share.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse
from joblib import Parallel, delayed, parallel_config

import skyward as sky


def call_with(callback: Any, value: Any) -> Any:
    """A task function pickled by reference that runs a callback found in its arguments."""
    return callback(value)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_an_object_captured_and_passed_is_one_object_on_the_node(
    executor: str, no_agents_left: None
) -> None:
    shared = {"rows": [1, 2, 3]}

    def is_captured(argument: object) -> bool:
        return argument is shared

    with sky.Compute(nodes=1, worker=sky.Worker(executor=executor)) as compute:
        assert compute.submit(is_captured, shared).result(timeout=60) is True
        assert list(compute.map(is_captured, [shared, shared])) == [True, True]


def test_a_callback_among_the_arguments_shares_objects_with_them(no_agents_left: None) -> None:
    marker = object()

    def is_marker(value: object) -> bool:
        return value is marker

    with sky.Compute(nodes=1) as compute:
        assert compute.submit(call_with, is_marker, marker).result(timeout=60) is True


def test_two_functions_of_one_task_share_what_they_capture(no_agents_left: None) -> None:
    seen: list[int] = []

    def record(x: int) -> list[int]:
        seen.append(x)
        return seen

    def read(_: object) -> list[int]:
        return seen

    def both(first: Any, second: Any) -> bool:
        return first(1) is second(None)

    with sky.Compute(nodes=1) as compute:
        assert compute.submit(both, record, read).result(timeout=60) is True


def test_parallel_keeps_a_captured_argument_one_object(no_agents_left: None) -> None:
    shared = np.arange(10)

    def is_captured(argument: object) -> bool:
        return argument is shared

    with sky.Compute(nodes=2, plugins=[sky.plugins.joblib()]) as compute:
        assert Parallel(n_jobs=2)(delayed(is_captured)(shared) for _ in range(6)) == [True] * 6
        assert compute.stats()["tasks"]["completed"] >= 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")  # sklearn's test marks
def test_sklearn_cross_val_score_fit_params_runs_on_the_cluster(no_agents_left: None) -> None:
    from sklearn.model_selection.tests.test_validation import test_cross_val_score_fit_params

    with sky.Compute(nodes=2, plugins=[sky.plugins.sklearn()]) as compute:
        with parallel_config(n_jobs=2):
            test_cross_val_score_fit_params(scipy.sparse.coo_matrix)
        assert compute.stats()["tasks"]["completed"] >= 1


def test_a_function_sharing_nothing_with_its_arguments_still_travels_once(
    no_agents_left: None,
) -> None:
    offset = 3

    def add(x: int) -> int:
        return x + offset

    with sky.Compute(nodes=1) as compute:
        assert list(compute.map(add, range(20))) == [x + 3 for x in range(20)]
        assert [compute.submit(add, x).result(timeout=60) for x in range(3)] == [3, 4, 5]
        node = compute.stats()["nodes"]["node-0"]
    assert node["blobs_sent"] == 1, node
