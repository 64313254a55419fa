"""Messages from running tasks to the client (``skyward.agent.emit``, ``Compute.on_message``)
and the plugins' worker initializers, on real Local agents with both executors."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import skyward as sky
from skyward.agent import emit
from skyward.errors import NodeStartError

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0
MARK = "SKYWARD_TEST_INITIALIZED"


def emit_and_return(topic: str, message: object) -> Any:
    return emit(topic, message)


def announce_then_hold() -> str:
    emit("progress", "started")
    emit("hold", None)  # answered once the test releases the handler
    return "finished"


def initialized(_: object = None) -> str | None:
    return os.environ.get(MARK)


def initialize() -> None:
    """A worker initializer (see ``Initializing`` below)."""
    os.environ[MARK] = f"before the tasks of pid {os.getpid()}"


@pytest.fixture(scope="module", params=["thread", "process"])
def compute(request: pytest.FixtureRequest) -> Iterator[sky.Compute]:
    worker = sky.Worker(concurrency=2, executor=request.param)
    with sky.Compute(nodes=1, worker=worker) as compute:
        yield compute


@pytest.fixture
def handlers(compute: sky.Compute) -> Iterator[Any]:
    """``handlers(topic, fn)`` registers a handler for this test only."""
    topics: list[str] = []

    def register(topic: str, handler: Any) -> None:
        topics.append(topic)
        compute.on_message(topic, handler)

    yield register
    for topic in topics:
        compute.on_message(topic, None)


def test_emit_returns_the_answer_of_a_handler_run_off_the_io_threads(
    compute: sky.Compute, handlers: Any
) -> None:
    ran_on: list[tuple[int, str]] = []

    def double(message: int) -> int:
        ran_on.append((os.getpid(), threading.current_thread().name))
        return 2 * message

    handlers("double", double)
    assert compute.submit(emit_and_return, "double", 21).result(WAIT) == 42
    [(pid, thread)] = ran_on
    assert pid == os.getpid()
    assert thread.startswith("skyward-message"), thread


def test_message_arrives_while_the_task_runs_and_a_slow_handler_stalls_no_node(
    compute: sky.Compute, handlers: Any
) -> None:
    seen: queue.Queue[str] = queue.Queue()
    release = threading.Event()
    handlers("progress", seen.put)
    handlers("hold", lambda _: release.wait(WAIT))
    node = compute.nodes[0]
    future = compute.submit(announce_then_hold)
    try:
        assert seen.get(timeout=WAIT) == "started"
        assert not future.done()  # its emit("hold") waits for the handler
        # While that handler blocks, the node still runs tasks and answers heartbeats.
        assert compute.submit(initialized).result(WAIT) is None
        heartbeats = node.heartbeats
        compute.stats(refresh=True, timeout=WAIT)
        assert node.heartbeats > heartbeats
        assert node.alive
    finally:
        release.set()
    assert future.result(WAIT) == "finished"


def test_an_exception_of_the_handler_is_raised_in_the_task(
    compute: sky.Compute, handlers: Any
) -> None:
    def refuse(message: object) -> None:
        raise ValueError(f"refused {message!r}")

    handlers("refuse", refuse)
    with pytest.raises(ValueError, match="refused 'this'"):
        compute.submit(emit_and_return, "refuse", "this").result(WAIT)


def test_a_topic_without_handler_is_a_clear_error(compute: sky.Compute) -> None:
    with pytest.raises(LookupError, match=r"topic 'nobody'.*compute\.on_message"):
        compute.submit(emit_and_return, "nobody", 1).result(WAIT)


def test_emit_outside_a_task_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="only in a task running on a Skyward node"):
        emit("progress", "from the client")


class Initializing:
    """A plugin contributing a worker initializer."""

    def __init__(self, initializer: str) -> None:
        self.initializer = initializer

    @sky.hookimpl
    def worker_initializers(self) -> list[str]:
        return [self.initializer]


def test_worker_initializers_run_in_every_slot_before_the_tasks(no_agents_left: None) -> None:
    worker = sky.Worker(concurrency=2, executor="process")
    plugins = [Initializing(f"{__name__}:{initialize.__name__}")]
    with sky.Compute(nodes=2, worker=worker, plugins=plugins) as compute:
        marks = list(compute.map(initialized, range(8)))
    assert all(mark and mark.startswith("before the tasks") for mark in marks), marks


def test_a_failing_worker_initializer_stops_the_start_and_is_named(
    capfd: pytest.CaptureFixture[str], no_agents_left: None
) -> None:
    name = f"{__name__}:no_such_function"
    with pytest.raises(NodeStartError), sky.Compute(plugins=[Initializing(name)]):
        pass
    assert f"worker initializer {name!r} failed" in capfd.readouterr().err


def test_a_malformed_worker_initializer_is_a_plugin_error() -> None:
    with (
        pytest.raises(sky.PluginError, match=r"Initializing.worker_initializers returned 'setup'"),
        sky.Compute(plugins=[Initializing("setup")]),
    ):
        pass
