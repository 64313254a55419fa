"""Issue 12, row 2: a large argument's identity is trusted within one call only.

Within one ``Parallel`` call or one ``Compute.map`` a large array is pickled and
hashed once; across calls, and for plain ``submit``, its content decides, so an
array changed in place is always seen by the next call.
"""

from __future__ import annotations

import numpy as np
from joblib import Parallel, delayed

import skyward as sky
from skyward import wire

SIZE = 2**18  # float64 elements: 2 MiB, above the blob threshold


def _blobs_sent(compute: sky.Compute) -> int:
    return sum(n["blobs_sent"] for n in compute.stats()["nodes"].values())


def test_an_array_changed_in_place_is_seen_by_the_next_submit(no_agents_left: None) -> None:
    a = np.zeros(SIZE)
    assert a.nbytes >= wire.BLOB_THRESHOLD
    with sky.Compute(nodes=1) as compute:
        assert compute.submit(np.sum, a).result(timeout=60) == 0.0
        a += 1
        assert compute.submit(np.sum, a).result(timeout=60) == SIZE
        assert compute.submit(np.sum, a).result(timeout=60) == SIZE
        # matched by content: the unchanged third send reuses the second blob
        assert _blobs_sent(compute) == 2


def test_an_array_changed_between_parallel_calls_is_seen(no_agents_left: None) -> None:
    a = np.zeros(SIZE)
    with sky.Compute(
        nodes=2, worker=sky.Worker(concurrency=1), plugins=[sky.plugins.joblib()]
    ) as compute:
        for step in range(3):
            totals = Parallel(n_jobs=2, batch_size=1)(delayed(np.sum)(a) for _ in range(4))
            assert totals == [step * SIZE] * 4, f"call {step} computed on stale data"
            a += 1
        assert compute.stats()["tasks"]["completed"] >= 12


def test_an_array_changed_between_map_calls_is_seen(no_agents_left: None) -> None:
    a = np.zeros(SIZE)
    with sky.Compute(nodes=1) as compute:
        assert list(compute.map(np.sum, [a, a])) == [0.0, 0.0]
        a += 1
        assert list(compute.map(np.sum, [a, a], chunksize=2)) == [SIZE, SIZE]
        a += 1
        assert list(compute.map(np.sum, [a])) == [2 * SIZE]


def test_within_a_call_a_large_object_is_pickled_once() -> None:
    registry = wire.BlobRegistry()
    a = np.zeros(SIZE)
    with registry.scope() as scope:
        _, first = wire.dumps_task(np.sum, (a,), {}, registry, scope)
        a += 1  # changed while the call runs: the call keeps the name it gave the object
        _, second = wire.dumps_task(np.sum, (a,), {}, registry, scope)
    assert first == second
    _, after = wire.dumps_task(np.sum, (a,), {}, registry)
    assert after != first  # the call is over: content decides
    _, again = wire.dumps_task(np.sum, (a.copy(),), {}, registry)
    assert again == after
