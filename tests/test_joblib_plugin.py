"""The joblib plugin's hooks: image, backend routing, warning filters, and exact restore."""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from contextlib import nullcontext

import pytest
from joblib import Parallel, delayed, parallel_config
from joblib import parallel as joblib_parallel

import skyward as sky
from skyward_joblib import JoblibPlugin, NoComputeError, SkywardBackend, activation

pytestmark = pytest.mark.timeout(120)


def pid_of(_: object = None) -> int:
    return os.getpid()


def joblib_state() -> tuple[object, ...]:
    """What the plugin may touch: the filters (identity and content) and joblib's defaults."""
    return (
        warnings.filters,
        list(warnings.filters),
        joblib_parallel.DEFAULT_BACKEND,
        getattr(joblib_parallel._backend, "config", None),
    )


def agent_pids(compute: sky.Compute) -> set[int]:
    return {node.pid for node in compute.nodes if node.pid is not None}


# --- the image ----------------------------------------------------------------------------------


def test_transform_image_adds_joblib():
    image = sky.Image(pip=["numpy"])
    assert sky.plugins.joblib().transform_image(image).pip == ("numpy", "joblib", "threadpoolctl")
    pinned = sky.plugins.joblib(version="1.4.0").transform_image(image)
    assert pinned.pip == ("numpy", "joblib==1.4.0", "threadpoolctl")


@pytest.mark.parametrize("version", ["latest", "==1.4", "1.4.0; rm -rf", "", 1.4])
def test_version_is_validated(version):
    with pytest.raises(ValueError, match=r"sky.plugins.joblib\(version=.*such as '1.4.2'"):
        sky.plugins.joblib(version=version)


def test_compute_image_carries_the_pin(no_agents_left):
    with sky.Compute(plugins=[sky.plugins.joblib(version="1.4.0")]) as compute:
        assert "joblib==1.4.0" in compute.image.pip


# --- routing and restore -----------------------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True], ids=["normal-exit", "exception"])
def test_state_is_restored_after_the_block(no_agents_left, fails):
    before = joblib_state()
    with pytest.raises(RuntimeError, match="boom") if fails else nullcontext():
        with sky.Compute(
            nodes=1, worker=sky.Worker(concurrency=2), plugins=[sky.plugins.joblib()]
        ) as compute:
            backend, _ = joblib_parallel.get_active_backend()
            assert isinstance(backend, SkywardBackend)
            assert joblib_parallel.DEFAULT_BACKEND == "skyward"
            assert set(Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4))) <= agent_pids(
                compute
            )
            if fails:
                raise RuntimeError("boom")
    after = joblib_state()
    assert after[0] is before[0]
    assert after[1:] == before[1:]


def test_two_joblib_based_plugins_do_not_stack(no_agents_left):
    class Derived(JoblibPlugin):
        name = "derived"

    before = joblib_state()
    with sky.Compute(
        nodes=1, worker=sky.Worker(concurrency=2), plugins=[sky.plugins.joblib(), Derived()]
    ) as compute:
        assert joblib_parallel._backend.config["backend"].compute is compute
        assert activation._computes.count(compute) == 1  # the second plugin changed nothing
        assert set(Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4))) <= agent_pids(compute)
    after = joblib_state()
    assert after[0] is before[0]
    assert after[1:] == before[1:]


def test_overlapping_clusters_in_two_threads_restore_the_original(no_agents_left):
    before = joblib_state()
    a_up, b_up, a_down = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second_cluster() -> None:
        try:
            a_up.wait(60)
            with sky.Compute(plugins=[sky.plugins.joblib()]):
                b_up.set()
                a_down.wait(60)
                assert joblib_parallel.DEFAULT_BACKEND == "skyward"
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            b_up.set()

    thread = threading.Thread(target=second_cluster)
    thread.start()
    try:
        with sky.Compute(plugins=[sky.plugins.joblib()]):
            a_up.set()
            assert b_up.wait(60)
        a_down.set()  # the first cluster ends while the second still runs
    finally:
        a_up.set()
        a_down.set()
        thread.join(60)
    assert not errors, errors
    after = joblib_state()
    assert after[1:] == before[1:]


def test_parallel_config_outside_the_plugin_uses_the_running_compute(no_agents_left):
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2)) as compute:
        assert joblib_parallel.DEFAULT_BACKEND != "skyward"
        with parallel_config(backend="skyward"):
            pids = set(Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4)))
        assert pids <= agent_pids(compute)


def test_no_running_compute_is_a_clear_error():
    with parallel_config(backend="skyward"):
        with pytest.raises(NoComputeError, match=r"with sky.Compute\(.*plugins=\[sky.plugins"):
            Parallel(n_jobs=2)(delayed(pid_of)(i) for i in range(4))
        # n_jobs=1 needs no cluster: it runs here, as with any backend.
        assert Parallel(n_jobs=1)(delayed(pid_of)(i) for i in range(2)) == [os.getpid()] * 2


# --- warning filters ----------------------------------------------------------------------------


def test_only_stdlib_warning_filters_stay_while_the_cluster_runs(no_agents_left):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pytest.PytestWarning)
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", category=ResourceWarning, module="socket")
        before = list(warnings.filters)
        with sky.Compute(plugins=[sky.plugins.joblib()]):
            categories = [f[2] for f in warnings.filters]
            assert pytest.PytestWarning not in categories
            assert UserWarning in categories and ResourceWarning in categories
            assert all(
                c.__module__ == "builtins" or c.__module__ in sys.stdlib_module_names
                for c in categories
            )
        assert warnings.filters == before


CLIENT_ONLY_MODULE = '''
class ClientOnlyWarning(UserWarning):
    """A warning category the workers cannot import."""
'''


@pytest.fixture
def client_only_category(tmp_path, monkeypatch):
    """A warning category from a package on the client's path only, with a filter for it."""
    name = f"client_only_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(CLIENT_ONLY_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))  # imported here; agents started later cannot find it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", module.ClientOnlyWarning)
        yield name
    sys.modules.pop(name, None)


def sklearn_style_call() -> list[int]:
    """scikit-learn's Parallel copies warnings.filters into every task payload."""
    from sklearn.utils.parallel import Parallel as SkParallel
    from sklearn.utils.parallel import delayed as sk_delayed

    return SkParallel(n_jobs=2)(sk_delayed(abs)(-i) for i in range(4))


def test_client_only_warning_category_breaks_tasks_without_sanitizing(
    client_only_category, no_agents_left
):
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2)):
        with (
            parallel_config(backend="skyward"),
            pytest.raises(ModuleNotFoundError, match=client_only_category),
        ):
            sklearn_style_call()


def test_client_only_warning_category_is_dropped_by_the_plugin(
    client_only_category, no_agents_left
):
    before = list(warnings.filters)
    with sky.Compute(nodes=1, worker=sky.Worker(concurrency=2), plugins=[sky.plugins.joblib()]):
        assert sklearn_style_call() == [0, 1, 2, 3]
    assert warnings.filters == before
