"""sky.AWS end to end: EC2 on a moto server, the "instances" reached on loopback sshd hosts.

Everything but the EC2 API is real: the provider creates the key pair, security group
and instances on moto, the injected resolver maps instance ``AmiLaunchIndex`` i to
the i-th loopback daemon, the client reads each instance's host key from its console
(``GetConsoleOutput`` on moto, whose consoles show the i-th daemon's own key: the
``consoles`` seam in ``moto_ec2.py``) and pins it, logs in with the cluster key pair
(here: a key the daemons authorize), bootstraps over SSH, runs joblib tasks, and tears
everything down. moto's own public IPs are never contacted.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import need, wait_until
from spot_tasks import at_once, held
from sshd_hosts import SSHD, bootstrapped_agents, start_sshd, stop_sshd, write_keypair

import skyward as sky
from skyward.agent import spot
from skyward.errors import HostKeyError
from skyward.providers.aws.userdata import HOST_KEY_MARK, render_wrapper

if TYPE_CHECKING:
    from moto_ec2 import Consoles, Moto
    from spot_metadata import Metadata

pytest_plugins = ["moto_ec2", "spot_metadata"]
pytestmark = pytest.mark.timeout(180)

# Three daemons of their own, each with its own host key, as a cluster's instances have.
# Free ports are picked at start, so two test sessions on one machine do not collide.
ADDRESSES = ("127.0.0.5", "127.0.0.6", "127.0.0.7")


def free_port(address: str) -> int:
    """A TCP port nobody listens on at ``address`` right now."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class FakeInstances:
    """Loopback daemons standing in for the instances, and the keys the provider is given."""

    addresses: tuple[str, ...]
    ports: tuple[int, ...]
    host_keys: tuple[str, ...]  # "ssh-ed25519 AAAA...", the i-th daemon's
    client_key_file: str
    pids: tuple[int, ...]

    def console(self, instance: Any) -> str:
        """What instance i (moto's model) prints on its console: the i-th daemon's key."""
        return f"{HOST_KEY_MARK} {self.host_keys[instance.ami_launch_index]}\r\n"

    def fingerprint(self, index: int) -> str:
        """The i-th daemon's host key fingerprint, as paramiko prints it."""
        import base64

        import paramiko

        kind, data = self.host_keys[index].split()
        return str(paramiko.PKey.from_type_string(kind, base64.b64decode(data)).fingerprint)

    def resolver(self, instance: Mapping[str, Any]) -> tuple[str, int]:
        """Instance -> its daemon: the i-th instance of the reservation, the i-th address."""
        index = instance["AmiLaunchIndex"]
        return self.addresses[index], self.ports[index]

    def specs(self) -> list[str]:
        """``address:port`` of every daemon."""
        return [f"{a}:{p}" for a, p in zip(self.addresses, self.ports, strict=True)]

    def sessions(self) -> list[int]:
        """Pids of sshd processes serving connections (children of the daemons)."""
        import psutil

        found = []
        for pid in self.pids:
            try:
                found += [p.pid for p in psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found


@pytest.fixture(scope="module")
def fake_instances() -> Iterator[FakeInstances]:
    need(os.path.exists(SSHD), "sshd (package openssh-server)")
    os.makedirs("/run/sshd", exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="skyward-aws-sshd-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client_key = workdir / "cluster_login_key"
        authorized = workdir / "authorized_keys"
        authorized.write_text(write_keypair(client_key) + "\n")
        ports = tuple(free_port(address) for address in ADDRESSES)
        public_keys = []
        for address, port in zip(ADDRESSES, ports, strict=True):
            host_key = workdir / f"host_key_{address}"
            public_keys.append(write_keypair(host_key))
            procs.append(start_sshd(address, port, host_key, authorized, workdir))
        yield FakeInstances(
            ADDRESSES, ports, tuple(public_keys), str(client_key), tuple(p.pid for p in procs)
        )
    finally:
        for proc in procs:
            stop_sshd(proc)
        shutil.rmtree(workdir, ignore_errors=True)


PICKLE_BY_VALUE = True  # see conftest: hosts do not have this module


@pytest.fixture
def clean(fake_instances: FakeInstances) -> Iterator[FakeInstances]:
    """Afterwards: no bootstrapped agent and no sshd session left (5 s grace)."""
    before = {p.pid for p in bootstrapped_agents()}
    yield fake_instances
    assert wait_until(lambda: not ({p.pid for p in bootstrapped_agents()} - before), 5.0)
    assert wait_until(lambda: not fake_instances.sessions(), 5.0), fake_instances.sessions()


@pytest.fixture
def image(ssh_wheelhouse: str) -> sky.Image:
    return sky.Image(pip=["threadpoolctl"], wheelhouse=ssh_wheelhouse)


@pytest.fixture
def provider(
    aws_provider: Callable[..., Any],
    clean: FakeInstances,
    ssh_env_root: str,
    consoles: Consoles,
) -> Callable[..., Any]:
    """``sky.AWS`` on moto whose instances are the loopback daemons (each instance's
    console shows its daemon's host key)."""
    consoles.show = clean.console

    def make(**options: Any) -> Any:
        defaults = {
            "resolve_address": clean.resolver,
            "ssh_key": clean.client_key_file,
            "user": getpass.getuser(),
            "python": sys.executable,
            "env_root": ssh_env_root,
        }
        return aws_provider(**{**defaults, **options})

    return make


def served_by() -> str:
    """The sshd address this task's agent was reached through."""
    return os.environ["SSH_CONNECTION"].split()[2]


def test_joblib_parallel_on_three_instances_then_nothing_is_left(
    moto: Moto, provider: Callable[..., Any], image: sky.Image
) -> None:
    from joblib import Parallel, delayed

    with sky.Compute(
        provider=provider(),
        nodes=3,
        worker=sky.Worker(concurrency=2),
        image=image,
        plugins=[sky.plugins.joblib()],
    ) as compute:
        cluster_id = compute.cluster_id
        instances = moto.live_instances(cluster_id)
        assert {i["State"]["Name"] for i in instances} == {"running"}
        assert sorted(n.name for n in compute.nodes) == sorted(i["InstanceId"] for i in instances)
        where = Parallel(n_jobs=-1)(delayed(served_by)() for _ in range(60))
        squares = Parallel(n_jobs=-1)(delayed(pow)(i, 2) for i in range(100))
    assert squares == [i * i for i in range(100)]
    assert set(where) == set(ADDRESSES)
    assert moto.leftovers(cluster_id) == []
    assert {i["State"]["Name"] for i in moto.all_instances(cluster_id)} == {"terminated"}


def test_exception_in_the_block_removes_everything(
    moto: Moto, provider: Callable[..., Any], image: sky.Image
) -> None:
    with pytest.raises(KeyError, match="boom"):
        with sky.Compute(provider=provider(), nodes=2, image=image) as compute:
            cluster_id = compute.cluster_id
            assert compute.submit(served_by).result() in ADDRESSES
            raise KeyError("boom")
    assert moto.leftovers(cluster_id) == []


def states(moto: Moto, cluster_id: str) -> dict[str, str]:
    """Every instance of the cluster on moto (terminated ones too) -> its state."""
    return {i["InstanceId"]: i["State"]["Name"] for i in moto.all_instances(cluster_id)}


def test_lost_node_is_replaced_by_a_new_instance(
    moto: Moto, provider: Callable[..., Any], image: sky.Image, caplog: pytest.LogCaptureFixture
) -> None:
    """A killed agent: the node's instance is terminated and a new one, pinned to its own
    host key, takes its place; the cost counts both."""
    caplog.set_level(logging.INFO, logger="skyward")
    with sky.Compute(provider=provider(), nodes=2, image=image) as compute:
        cluster_id = compute.cluster_id
        lost = compute.nodes[0]
        first = set(states(moto, cluster_id))
        assert lost.pid is not None and lost.name in first
        os.kill(lost.pid, signal.SIGKILL)
        assert wait_until(lambda: compute.nodes[0] is not lost and compute.nodes[0].alive, 60)
        replacement = compute.nodes[0].name
        assert replacement not in first
        assert states(moto, cluster_id) == {
            lost.name: "terminated",
            compute.nodes[1].name: "running",
            replacement: "running",
        }
        assert compute.total_slots == 2
        assert set(compute.map(lambda _: served_by(), range(20))) <= set(ADDRESSES[:2])
    assert moto.leftovers(cluster_id) == []
    assert set(states(moto, cluster_id).values()) == {"terminated"}
    summary = [m for m in caplog.messages if m.startswith(f"cluster {cluster_id} summary:")]
    assert "instance-hour(s) of c6a.large (1 replacement(s) included)" in summary[0], summary


def test_reclaimed_spot_instance_is_replaced_by_a_new_instance(
    moto: Moto,
    provider: Callable[..., Any],
    image: sky.Image,
    metadata: Metadata,
    by_value: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Spot instances on moto; the agents poll a loopback metadata service, which
    announces one interruption. The reclaimed node is let go (its tasks rerun), its
    instance terminated, and a new instance joins and takes work."""
    caplog.set_level(logging.INFO, logger="skyward")
    metadata.window = 1.0  # out of time at once: the held tasks rerun elsewhere
    aws = provider(spot=True, spot_endpoint=metadata.url)
    quick = sky.Image(pip=image.pip, wheelhouse=image.wheelhouse, env={spot.INTERVAL_ENV: "0.2"})
    folder = str(tmp_path)
    with sky.Compute(
        provider=aws, nodes=2, worker=sky.Worker(2), restarts=1, image=quick
    ) as compute:
        cluster_id = compute.cluster_id
        first = states(moto, cluster_id)
        assert len(first) == 2 and set(first.values()) == {"running"}
        described = moto.all_instances(cluster_id)
        assert {i.get("InstanceLifecycle") for i in described} == {"spot"}
        futures = [compute.submit(held, (i, folder)) for i in range(8)]
        assert wait_until(lambda: len(list(tmp_path.glob("started-*"))) >= 4, 30)
        metadata.armed.set()
        assert wait_until(lambda: compute.stats()["reclaims"] == 1, 30)
        assert compute._monitor is not None
        (reclaimed,) = [n.name for n in compute._monitor.reclaimed]
        assert reclaimed in first

        def replaced() -> bool:
            live = {n.name for n in compute.nodes if n.alive}
            return compute.total_slots == 4 and len(live - set(first)) == 1

        assert wait_until(replaced, 90), compute
        (new,) = {n for n in compute.nodes if n.alive and n.name not in first}
        now = states(moto, cluster_id)
        assert now[reclaimed] == "terminated" and now[new.name] == "running"
        assert len(now) == 3 and [s for s in now.values() if s == "running"] == ["running"] * 2
        (Path(folder) / "release").touch()
        results = [f.result(60) for f in futures]
        assert sorted(i for i, _ in results) == list(range(8))
        # The replacement takes work: four slots busy at once, its two among them.
        four = tmp_path / "four"
        four.mkdir()
        ran = {f.result(40) for f in [compute.submit(at_once, (str(four), 4)) for _ in range(4)]}
        assert new.pid in ran
        assert compute.stats()["tasks"]["completed"] == 8 + 4  # each result once
    assert moto.leftovers(cluster_id) == []
    assert set(states(moto, cluster_id).values()) == {"terminated"}
    (summary,) = [m for m in caplog.messages if m.startswith(f"cluster {cluster_id} summary:")]
    assert "1 spot reclaim(s)" in summary and "(1 replacement(s) included)" in summary


def test_each_instance_is_pinned_to_its_own_host_key_read_from_its_console(
    moto: Moto,
    provider: Callable[..., Any],
    clean: FakeInstances,
    image: sky.Image,
    consoles: Consoles,
) -> None:
    with sky.Compute(provider=provider(), nodes=2, image=image) as compute:
        instances = {i["InstanceId"]: i for i in moto.live_instances(compute.cluster_id)}
        presented = {
            node.name: node.channel.channel.get_transport().get_remote_server_key()  # type: ignore[attr-defined]
            for node in compute.nodes
        }
        assert len({key.get_base64() for key in presented.values()}) == 2
        for instance_id, key in presented.items():
            index = instances[instance_id]["AmiLaunchIndex"]
            assert f"{key.get_name()} {key.get_base64()}" == clean.host_keys[index]
    # Read from each instance's console, the latest output (Nitro).
    assert sorted(c["InstanceId"] for c in consoles.calls) == sorted(instances)
    assert all(c["Latest"] in (True, "true") for c in consoles.calls)


def test_an_instance_presenting_another_instance_key_is_refused(
    moto: Moto, provider: Callable[..., Any], clean: FakeInstances, image: sky.Image
) -> None:
    """Both instances are reached at the first one's address: the second instance's
    connection presents the first one's key, not its own, and is refused."""
    seen: list[str] = []

    def first_daemon(instance: Mapping[str, Any]) -> tuple[str, int]:
        seen.append(next(t["Value"] for t in instance["Tags"] if t["Key"] == "skyward:cluster"))
        return clean.addresses[0], clean.ports[0]

    with pytest.raises(HostKeyError) as info:
        with sky.Compute(provider=provider(resolve_address=first_daemon), nodes=2, image=image):
            pytest.fail("a host presenting another instance's key must not be used")
    message = str(info.value)
    assert "host key CHANGED" in message and "the pinned host keys" in message
    # trusted: the second instance's own key (from its console); offered: the first's.
    trusted, offered = message.split("offered by the host:")
    assert clean.fingerprint(1) in trusted and clean.fingerprint(0) in offered
    assert moto.leftovers(seen[0]) == []


def test_node_waits_while_the_instance_is_still_installing_python(
    moto: Moto,
    provider: Callable[..., Any],
    image: sky.Image,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The user-data wrapper says "still setting up" until ready; the launcher retries."""
    wrapper = tmp_path / "skyward-python"
    wrapper.write_text(render_wrapper(str(tmp_path), wait_seconds=1))
    wrapper.chmod(0o755)
    calls = tmp_path / "calls"
    counting = tmp_path / "counting-python"
    counting.write_text(f'#!/bin/sh\necho call >> {calls}\nexec {wrapper} "$@"\n')
    counting.chmod(0o755)

    def finish_setup() -> None:
        # The set-up "completes" once the client came back after a "still running" answer.
        wait_until(lambda: calls.exists() and len(calls.read_text().split()) >= 2, 60, 0.05)
        (tmp_path / "python").write_text(sys.executable + "\n")
        (tmp_path / "ready").touch()

    finisher = threading.Thread(target=finish_setup, daemon=True)
    finisher.start()
    # A fresh environment folder: a warm one would start the agent without the wrapper.
    aws = provider(
        python=str(counting), progress=True, poll_interval=0.2, env_root=str(tmp_path / "envs")
    )
    with sky.Compute(provider=aws, nodes=1, image=image) as compute:
        assert compute.submit(served_by).result() == ADDRESSES[0]
    finisher.join(5)
    err = capfd.readouterr().err
    assert "instance still installing Python; retrying" in err, err


CLIENT = textwrap.dedent(
    """
    import sys, time
    import skyward as sky
    from skyward.providers.aws import AWS

    mode, endpoint, ssh_key, user, env_root, wheelhouse, *addresses = sys.argv[1:]
    provider = AWS(
        region="us-east-1", endpoint_url=endpoint, ssh_cidr="198.51.100.7/32",
        instance_type="c6a.large", poll_interval=0.1, progress=True,
        resolve_address=lambda i: (
            addresses[i["AmiLaunchIndex"]].split(":")[0],
            int(addresses[i["AmiLaunchIndex"]].split(":")[1]),
        ),
        ssh_key=ssh_key, user=user, python=sys.executable,
        env_root=env_root,
    )
    image = sky.Image(pip=["threadpoolctl"], wheelhouse=wheelhouse)
    compute = sky.Compute(provider=provider, nodes=2, image=image).__enter__()
    compute.submit(print, "warm").result()
    print("READY", compute.cluster_id, flush=True)
    if mode == "signal":
        time.sleep(120)
    # mode "exit": the interpreter exits with the cluster still up (no `with` block)
    """
)


@pytest.mark.parametrize(
    "how", [signal.SIGINT, signal.SIGTERM, None], ids=["SIGINT", "SIGTERM", "interpreter-exit"]
)
def test_running_client_interrupted_or_exiting_removes_everything(
    moto: Moto,
    clean: FakeInstances,
    consoles: Consoles,
    ssh_env_root: str,
    ssh_wheelhouse: str,
    how: int | None,
) -> None:
    consoles.show = clean.console
    args = [
        "signal" if how else "exit", moto.endpoint, clean.client_key_file,
        getpass.getuser(), ssh_env_root, ssh_wheelhouse, *clean.specs(),
    ]  # fmt: skip
    cluster_id, code, err = moto.run_client(CLIENT, args, "READY", how)
    assert (code != 0) == (how is not None), err
    assert "terminating 2 instance(s)" in err, err
    assert moto.leftovers(cluster_id) == []


def test_exit_summary_shows_instance_hours_and_estimated_cost(
    moto: Moto, provider: Callable[..., Any], image: sky.Image, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="skyward")
    with sky.Compute(provider=provider(max_hourly_cost=1.0), nodes=2, image=image) as compute:
        cluster_id = compute.cluster_id
        assert compute.submit(served_by).result() in ADDRESSES
    (summary,) = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"cluster {cluster_id} summary:")
    ]
    assert "1 task(s) done" in summary
    assert re.search(
        r"; [0-9.]+ instance-hour\(s\) of c6a\.large, estimated cost \$[0-9.]+$", summary
    ), summary
    assert moto.leftovers(cluster_id) == []
