"""An AWS node's replacement and an aborted EC2 node start, on a moto server.

No node is opened here: the instances resolve to loopback addresses where nobody speaks
SSH, so every ``open`` blocks until aborted. Replacements that do come up (a spot
reclaim, a lost node) are tested end to end in ``test_aws_e2e.py``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
from conftest import wait_until

from skyward.errors import NodeStartError
from skyward.providers import ClusterSpec, Launcher
from skyward.spec import Image, Worker
from skyward.startup import NodeStarter

if TYPE_CHECKING:
    from moto_ec2 import Consoles, Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)

_counter = iter(range(1_000_000))
HANG_GUARD = 30.0  # seconds an aborted open may take before the test calls it a hang


def spec(nodes: int) -> ClusterSpec:
    """A cluster spec with a fresh id."""
    return ClusterSpec(nodes, Worker(), Image(), f"r{os.getpid():x}{next(_counter):04d}")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback port that accepts TCP connections (its backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


class Opening:
    """``launcher_open()`` run in a thread; its outcome kept."""

    def __init__(self, open_: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self.result: object = None

        def run() -> None:
            try:
                self.result = open_()
            except BaseException as exc:  # noqa: BLE001 - examined by the test
                self.error = exc

        self.thread = threading.Thread(target=run, name="test-open", daemon=True)
        self.thread.start()

    def ended(self) -> bool:
        self.thread.join(HANG_GUARD)
        return not self.thread.is_alive()


def attributes(moto: Moto, instance: Mapping[str, Any]) -> dict[str, Any]:
    """What an instance was started with, as EC2 describes it."""
    instance_id = instance["InstanceId"]

    def attribute(name: str, key: str) -> Any:
        reply = moto.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute=name)
        return reply[key].get("Value")

    return {
        "image": instance["ImageId"],
        "type": instance["InstanceType"],
        "key": instance["KeyName"],
        "groups": [g["GroupId"] for g in instance["SecurityGroups"]],
        "subnet": instance.get("SubnetId"),
        "lifecycle": instance.get("InstanceLifecycle"),
        "metadata": instance["MetadataOptions"]["HttpTokens"],
        "tags": sorted(
            (t["Key"], t["Value"]) for t in instance["Tags"] if t["Key"] != "skyward:created"
        ),
        "user data": attribute("userData", "UserData"),
        "shutdown": attribute(
            "instanceInitiatedShutdownBehavior", "InstanceInitiatedShutdownBehavior"
        ),
    }


def test_replacement_terminates_the_instance_and_runs_a_new_one_like_it(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    """The replacement's open terminates the node's instance, starts one new instance with
    the same spec (spot, key pair, group, user data, cluster tag); aborted while it waits
    for SSH, it terminates that instance too; the teardown finds nothing left."""
    cluster = spec(2)
    cid = cluster.cluster_id
    with ExitStack() as stack:
        launchers = aws_provider(spot=True, start_timeout=600).launch(cluster, stack)
        old = {i["InstanceId"]: i for i in moto.live_instances(cid)}
        lost = launchers[0]
        successor = lost.replacement()
        assert successor is not lost and lost.name in old
        opening = Opening(successor.open)
        assert wait_until(lambda: len(moto.all_instances(cid)) == 3, HANG_GUARD)
        (new,) = [i for i in moto.all_instances(cid) if i["InstanceId"] not in old]
        assert successor.name == new["InstanceId"]
        assert attributes(moto, new) == attributes(moto, old[lost.name])
        assert attributes(moto, new)["lifecycle"] == "spot"
        assert ("skyward:cluster", cid) in attributes(moto, new)["tags"]
        states = {i["InstanceId"]: i["State"]["Name"] for i in moto.all_instances(cid)}
        assert states[lost.name] == "terminated" and states[launchers[1].name] == "running"

        successor.abort()
        assert opening.ended(), "an aborted replacement kept opening"
        assert isinstance(opening.error, RuntimeError), opening.error
        assert "shutting down" in str(opening.error)
        # The replacement that never came up is not left running while the cluster goes on.
        states = {i["InstanceId"]: i["State"]["Name"] for i in moto.all_instances(cid)}
        assert states[new["InstanceId"]] == "terminated"
        assert [i["InstanceId"] for i in moto.live_instances(cid)] == [launchers[1].name]
    assert moto.leftovers(cid) == []


def test_replacement_cost_counts_the_new_instance(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    """Two instances, one replaced: three instances of at least a minute each."""
    cluster = spec(2)
    provider = aws_provider(start_timeout=600)
    with ExitStack() as stack:
        launchers = provider.launch(cluster, stack)
        assert provider.summary(cluster.cluster_id).startswith("0.0333 instance-hour(s) ")
        successor = launchers[1].replacement()
        opening = Opening(successor.open)
        assert wait_until(lambda: len(moto.all_instances(cluster.cluster_id)) == 3, HANG_GUARD)
        summary = provider.summary(cluster.cluster_id)
        assert summary.startswith("0.05 instance-hour(s) of c6a.large (1 replacement(s) ")
        successor.abort()
        assert opening.ended()
    assert moto.leftovers(cluster.cluster_id) == []


@pytest.mark.parametrize("step", ["ssh", "host key"])
def test_abort_ends_a_node_start_blocked_in_the_launcher(
    moto: Moto,
    aws_provider: Callable[..., Any],
    consoles: Consoles,
    listener: socket.socket,
    step: str,
) -> None:
    """Ctrl-C during start-up aborts the node starts: an EC2 launcher waiting for its
    instance's SSH port, or for its host key on the console (never printed here), gives
    up at once instead of at the start deadline (10 minutes here)."""
    address = listener.getsockname() if step == "host key" else ("127.0.0.1", 9)
    cluster = spec(1)
    with ExitStack() as stack:
        launchers: list[Launcher] = aws_provider(
            start_timeout=600, resolve_address=lambda _: address
        ).launch(cluster, stack)

        def no_node(index: int, channel: object) -> Any:
            raise AssertionError("no agent can have started")

        starter = NodeStarter(launchers, {}, no_node, timeout=5)
        opening = Opening(lambda: starter.open(0))
        assert wait_until(lambda: 0 in starter._starting, HANG_GUARD)
        if step == "host key":
            assert wait_until(lambda: len(consoles.calls) >= 2, HANG_GUARD)
        else:
            assert not consoles.calls
        starter.abort()
        assert opening.ended(), f"an aborted start kept waiting ({step})"
        assert isinstance(opening.error, NodeStartError), opening.error
        # Ended by the launcher itself, inside its wait (not refused before it began).
        assert "the cluster is shutting down" in str(opening.error)
        assert launchers[0].name in str(opening.error)
    assert moto.leftovers(cluster.cluster_id) == []


def test_cluster_end_waits_for_a_replacement_instance_being_started_then_removes_it(
    moto: Moto, aws_provider: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block ends while a replacement's RunInstances call is still in flight (held
    on the moto server): the teardown waits for it, so the instance it starts is removed
    with the rest rather than left running."""
    from moto.ec2.responses.instances import InstanceResponse

    original = InstanceResponse.run_instances
    hold, entered, release = threading.Event(), threading.Event(), threading.Event()

    def held_run_instances(self: Any) -> Any:
        if hold.is_set():
            entered.set()
            release.wait(HANG_GUARD)
        return original(self)

    monkeypatch.setattr(InstanceResponse, "run_instances", held_run_instances)
    cluster = spec(1)
    stack = ExitStack()
    try:
        (lost,) = aws_provider(start_timeout=600).launch(cluster, stack)
        hold.set()
        successor = lost.replacement()
        opening = Opening(successor.open)
        assert entered.wait(HANG_GUARD)
        closing = Opening(stack.close)
        # Still waiting for the instance start in flight, however long we look.
        assert not wait_until(lambda: not closing.thread.is_alive(), 1.0)
    finally:
        release.set()
    assert closing.ended() and closing.error is None, closing.error
    assert opening.ended() and isinstance(opening.error, RuntimeError), opening.error
    every = {i["InstanceId"]: i["State"]["Name"] for i in moto.all_instances(cluster.cluster_id)}
    assert len(every) == 2 and set(every.values()) == {"terminated"}, every
    assert moto.leftovers(cluster.cluster_id) == []
