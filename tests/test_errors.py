"""The bad-input catalogue: each mistake gives a clear error naming the fix, in bounded time."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import skyward as sky

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("nodes", [0, -3])
def test_nodes_must_be_positive(nodes: int) -> None:
    with pytest.raises(ValueError, match="at least one node"):
        sky.Compute(nodes=nodes)


def test_concurrency_zero() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        sky.Worker(concurrency=0)


def test_unknown_executor() -> None:
    with pytest.raises(ValueError, match="executor='thread'.*executor='process'"):
        sky.Worker(executor="fork")  # type: ignore[arg-type]


def test_bad_package_spec() -> None:
    with pytest.raises(ValueError, match="invalid pip requirement"):
        sky.Image(pip=["numpy >= = 2"])


def test_unknown_plugin_name() -> None:
    with pytest.raises(AttributeError, match="installed:"):
        sky.plugins.not_a_plugin  # noqa: B018


def test_plugin_object_with_no_hooks() -> None:
    class Empty:
        def transform_image(self, image: sky.Image) -> sky.Image:  # not decorated
            return image

    with pytest.raises(sky.PluginError, match="@sky.hookimpl"):
        sky.Compute(plugins=[Empty()])


def test_conflicting_pins() -> None:
    class Pin:
        def __init__(self, name: str, pin: str) -> None:
            self.name, self.pin = name, pin

        @sky.hookimpl
        def transform_image(self, image: sky.Image) -> sky.Image:
            return image.with_pip(self.pin)

    compute = sky.Compute(plugins=[Pin("a", "numpy==2.0"), Pin("b", "numpy==2.1")])
    with pytest.raises(sky.PinConflictError, match="conflicting pins for 'numpy'"):
        compute.__enter__()


def test_task_that_cannot_be_pickled() -> None:
    with sky.Compute() as compute, pytest.raises(sky.UnpicklableTaskError, match="picklable"):
        compute.submit(print, threading.Lock())


def return_lock() -> Any:
    return threading.Lock()


def test_result_that_cannot_be_pickled() -> None:
    with sky.Compute() as compute, pytest.raises(TypeError, match="result of task .* cannot be"):
        compute.submit(return_lock).result(timeout=30)


def test_task_whose_module_is_missing_on_the_worker(tmp_path: Path) -> None:
    with sky.Compute() as compute:
        # The module exists only on the client: created after the agents started.
        (tmp_path / "client_only_mod.py").write_text("def f():\n    return 1\n")
        sys.path.insert(0, str(tmp_path))
        try:
            import client_only_mod  # type: ignore[import-not-found]

            with pytest.raises(ModuleNotFoundError) as info:
                compute.submit(client_only_mod.f).result(timeout=30)
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("client_only_mod", None)
    notes = "\n".join(info.value.__notes__)
    assert "'client_only_mod' is not installed on the worker" in notes
    assert "sky.Image(pip=[...])" in notes


FAKE_AGENT = textwrap.dedent(
    """
    import os, sys
    from skyward import wire
    from skyward.wire import Kind
    reader = os.fdopen(0, "rb")
    wire.read_frame(reader)
    info = wire.versions()
    info.update(python="3.8.18", pid=os.getpid())
    sys.stdout.buffer.write(wire.encode_obj(Kind.HELLO, info))
    sys.stdout.buffer.flush()
    while reader.read(1):
        pass
    """
)


def test_python_version_mismatch_is_refused_before_any_task(tmp_path: Path) -> None:
    agent = tmp_path / "fake_agent.py"
    agent.write_text(FAKE_AGENT)
    interpreter = tmp_path / "python3.8"
    interpreter.write_text(f"#!/bin/sh\nexec {sys.executable} {agent}\n")
    interpreter.chmod(0o755)
    compute = sky.Compute(provider=sky.Local(python=str(interpreter)))
    with pytest.raises(sky.VersionMismatchError, match=r"Python cpython 3\.8\.18 on the worker"):
        compute.__enter__()


def test_missing_interpreter_names_the_node_and_step() -> None:
    compute = sky.Compute(provider=sky.Local(python="/nonexistent/python"))
    with pytest.raises(RuntimeError, match=r"node-0: .*nonexistent.*\(step: start agent\)"):
        compute.__enter__()


def test_compute_used_after_exit() -> None:
    compute = sky.Compute()
    with compute:
        pass
    with pytest.raises(sky.ComputeStateError, match="was shut down"):
        compute.submit(os.getpid)
    with pytest.raises(sky.ComputeStateError, match="create a new"):
        compute.__enter__()


def test_compute_used_before_enter() -> None:
    with pytest.raises(sky.ComputeStateError, match="is not started"):
        sky.Compute().submit(os.getpid)


def test_nested_compute_of_the_same_object() -> None:
    compute = sky.Compute()
    with compute:
        with pytest.raises(sky.ComputeStateError, match="already running"):
            compute.__enter__()
        assert compute.submit(abs, -2).result(timeout=30) == 2
