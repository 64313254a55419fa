"""A running AWS cluster's instances and the launcher of each node.

The :class:`Fleet` holds what every instance of one cluster is started with (the
``run_instances`` arguments: key pair, security group, user data, tags, market,
subnet), records each instance it starts for the teardown and the cost, and can
start one more like the others: a node's replacement (:meth:`EC2Launcher.replacement`)
terminates the node's instance and opens a new one, pinned to its own host key.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from skyward.channel import Channel
from skyward.errors import NodeStartError
from skyward.providers import Launcher
from skyward.providers.aws import ec2 as api
from skyward.providers.aws.catalog import RunCost
from skyward.providers.aws.keys import Address, console_host_key, pinned_host_keys
from skyward.providers.aws.teardown import ClusterResources
from skyward.providers.aws.userdata import SETUP_PENDING
from skyward.waits import retries

if TYPE_CHECKING:
    import paramiko

    from skyward.providers.ssh import HostLauncher

__all__ = ["EC2Launcher", "Fleet"]

AddressResolver = Callable[[Mapping[str, Any]], Address]

_REOPEN_TIMEOUT = 120.0  # seconds for a restarted node to reach its (running) instance again
# Seconds the cluster's end waits for a run_instances call in flight (boto3's own
# timeouts bound the call), so the teardown that follows sees the instances it starts.
_RUN_GRACE = 120.0

_RUN_HINTS = {
    "VcpuLimitExceeded": ". Request a higher EC2 vCPU quota (Service Quotas) or use fewer or "
    "smaller nodes",
    "InstanceLimitExceeded": ". Request a higher EC2 instance quota or use fewer nodes",
    "InsufficientInstanceCapacity": ". AWS has no capacity for this type right now: try "
    "another instance_type, subnet_id or region, or later",
    "UnauthorizedOperation": ". The credentials lack a permission: see the IAM policy in "
    "Skyward's AWS docs",
    "InvalidAMIID.NotFound": ". Check sky.AWS(ami=...) and the region",
}


class _ShuttingDown(RuntimeError):
    """The cluster is ending (or the start was aborted)."""


@dataclass(eq=False)
class Fleet:
    """The instances of one cluster: how to start them, and what was started.

    Args:
        ec2: the boto3 EC2 client.
        cluster_id: the cluster's id (its tag is in ``run_args``).
        run_args: ``run_instances`` arguments shared by every instance (no counts, no
            client token).
        created: ids the teardown removes; each instance started is added at once.
        cost: instance-hours, each instance counted from its start.
        resolve_address: instance description -> ``(host, port)`` to SSH to.
        host_options: :class:`~skyward.providers.ssh.HostLauncher` options (user, key,
            image, interpreter).
        start_timeout: seconds an instance has to run and accept the agent.
        poll: seconds between polls.
        progress: print progress lines on stderr.
    """

    ec2: Any
    cluster_id: str
    run_args: dict[str, Any]
    created: ClusterResources
    cost: RunCost
    resolve_address: AddressResolver
    host_options: dict[str, Any]
    start_timeout: float
    poll: float
    progress: bool
    _launchers: list[EC2Launcher] = field(default_factory=list, init=False)
    _in_flight: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)

    def run(self, count: int, *, replacement: bool = False) -> list[str]:
        """Start ``count`` instances; their ids, recorded for the teardown and the cost."""
        with self._cond:
            if self._closed:
                raise _ShuttingDown(f"cluster {self.cluster_id} is shutting down")
            self._in_flight += 1
        try:
            args = {
                **self.run_args,
                "MinCount": count,
                "MaxCount": count,
                # Idempotent: a retried request (lost reply) cannot start a second set.
                "ClientToken": f"skyward-{self.cluster_id}-{secrets.token_hex(8)}",
            }
            try:
                reply = self.ec2.run_instances(**args)
            except Exception as exc:
                code = api.error_code(exc)
                if not code:
                    raise
                what = "a replacement" if replacement else "the cluster"
                raise RuntimeError(
                    f"EC2 did not start {count} x {args['InstanceType']} from "
                    f"{args['ImageId']}: {exc}{_RUN_HINTS.get(code, '')}; "
                    f"{what} is being removed"
                ) from exc
            ids = [str(i["InstanceId"]) for i in reply["Instances"]]
            self.created.instance_ids.extend(ids)
            self.cost.launched(ids, replacement)
            return ids
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def terminate(self, instance_id: str) -> None:
        """Terminate one instance now (already gone is no error); on failure the teardown
        at the cluster's end still removes it (its id is recorded, its tag set)."""
        try:
            self.ec2.terminate_instances(InstanceIds=[instance_id])
        except Exception as exc:  # noqa: BLE001 - logged; the teardown retries
            if api.error_code(exc) != "InvalidInstanceID.NotFound":
                api.log.warning("could not terminate %s now: %s", instance_id, exc)
                return
        self.cost.terminated(instance_id)

    def wait_running(
        self, ids: list[str], deadline: float, stop: threading.Event | None = None
    ) -> list[dict[str, Any]]:
        """Poll until every instance of ``ids`` runs; their descriptions, in launch order."""
        started = time.monotonic()
        shown: dict[str, int] | None = None
        states: dict[str, str] = {}
        for _ in retries(deadline, self.poll, stop=stop):
            found = {i["InstanceId"]: i for i in api.describe_instances(self.ec2, InstanceIds=ids)}
            states = {i: found[i]["State"]["Name"] if i in found else "requested" for i in ids}
            for instance_id, state in states.items():
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    reason = found[instance_id].get("StateReason", {}).get("Message", "")
                    raise RuntimeError(
                        f"EC2 instance {instance_id} went {state} while starting"
                        f"{f' ({reason})' if reason else ''}; it is being removed"
                    )
            counts = dict(Counter(states.values()))
            if counts != shown:
                summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                api.say(
                    f"waiting for {len(ids)} instance(s): {summary} "
                    f"({time.monotonic() - started:.0f}s)",
                    self.progress,
                )
                shown = counts
            if all(s == "running" for s in states.values()):
                return sorted((found[i] for i in ids), key=lambda i: i.get("AmiLaunchIndex", 0))
        if stop is not None and stop.is_set():
            raise _ShuttingDown(f"cluster {self.cluster_id} is shutting down")
        pending = sorted(i for i, s in states.items() if s != "running")
        raise TimeoutError(
            f"EC2 instances still not running after {self.start_timeout:.0f}s "
            f"({', '.join(f'{i}: {states[i]}' for i in pending)}); they are being "
            "removed. Raise sky.AWS(start_timeout=...) or check the EC2 console"
        )

    def launcher(self, instance: Mapping[str, Any] | None, deadline: float) -> EC2Launcher:
        """The launcher of a running ``instance`` (``None``: a replacement, whose
        instance it starts itself); closed at once if the cluster is ending."""
        launcher = EC2Launcher(self, instance, deadline)
        with self._cond:
            closed = self._closed
            if not closed:
                self._launchers.append(launcher)
        if closed:
            launcher.close()
        return launcher

    def close(self) -> None:
        """Start nothing more, close every launcher, and wait (bounded) for an instance
        start in flight, so the teardown that follows finds what it started."""
        with self._cond:
            self._closed = True
            launchers = list(self._launchers)
        for launcher in launchers:
            launcher.close()
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight == 0, timeout=_RUN_GRACE)


class EC2Launcher(Launcher):
    """Wait for one instance's SSH port and its host key on its console, then open it like
    any SSH host, with only that key trusted.

    While the instance's user data is still installing Python, the interpreter wrapper
    answers :data:`SETUP_PENDING`; the launcher retries until the start deadline. A
    launcher made by :meth:`replacement` has no instance yet: its :meth:`open`
    terminates its predecessor's instance and starts a new one first.
    """

    def __init__(self, fleet: Fleet, instance: Mapping[str, Any] | None, deadline: float) -> None:
        self.fleet = fleet
        self.deadline = deadline
        self.instance_id: str | None = None
        self.address: Address | None = None
        self.name = "replacement"
        if instance is not None:
            self.instance_id = self.name = str(instance["InstanceId"])
            self.address = fleet.resolve_address(instance)
        self.predecessor: EC2Launcher | None = None
        self._host: HostLauncher | None = None
        self._host_key: paramiko.PKey | None = None
        self._opened = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def replacement(self) -> Launcher:
        """A launcher for a new instance like this one, which this one's is traded for."""
        successor = self.fleet.launcher(None, self.deadline)
        successor.predecessor = self
        successor.name = f"replacement of {self.name}"
        return successor

    def open(self) -> Channel:
        with self._lock:
            if self._closed.is_set():
                raise _ShuttingDown(f"{self.name}: the cluster is shutting down")
            # A restart of a lost node opens again: drop the old connection, allow new time.
            previous, self._host = self._host, None
            first = self._opened == 0
            self._opened += 1
        if previous is not None:
            previous.close()
        if self.address is not None:
            return self._connect(self.deadline if first else time.monotonic() + _REOPEN_TIMEOUT)
        try:
            self._launch()
            return self._connect(self.deadline)
        except BaseException:
            # A replacement that did not come up is not left running (and billed) while
            # the cluster goes on; opening it again would start another.
            if self.instance_id is not None:
                self.fleet.terminate(self.instance_id)
            self.instance_id = self.address = self._host_key = None
            raise

    def _connect(self, deadline: float) -> Channel:
        from skyward.providers.ssh import HostLauncher

        assert self.instance_id is not None and self.address is not None
        self._wait_for_ssh(self.address, deadline)
        if self._host_key is None:
            api.say(f"{self.name}: reading its SSH host key from its console", self.fleet.progress)
            self._host_key = console_host_key(
                self.fleet.ec2, self.instance_id, deadline, self.fleet.poll, self._closed
            )
        pinned = pinned_host_keys(self.address, self._host_key)
        host, port = self.address
        pending: NodeStartError | None = None
        for _ in retries(deadline, self.fleet.poll, stop=self._closed):
            if pending is not None:
                api.say(
                    f"{self.name}: instance still installing Python; retrying", self.fleet.progress
                )
            launcher = HostLauncher(
                self.name, host, port, host_keys=pinned, **self.fleet.host_options
            )
            with self._lock:
                if self._closed.is_set():
                    break
                self._host = launcher
            try:
                return launcher.open()
            except NodeStartError as exc:
                if SETUP_PENDING not in str(exc):
                    raise
                pending = exc
        if pending is None or self._closed.is_set():
            raise _ShuttingDown(f"{self.name}: the cluster is shutting down")
        raise pending

    def _launch(self) -> None:
        """Trade the predecessor's instance for a new one, running, with the same spec."""
        old = self.predecessor
        if old is not None:
            old.close()
            if old.instance_id is not None:
                api.say(
                    f"{old.instance_id}: terminating it for a new instance", self.fleet.progress
                )
                self.fleet.terminate(old.instance_id)
            self.predecessor = None
        self.deadline = time.monotonic() + self.fleet.start_timeout
        (instance_id,) = self.fleet.run(1, replacement=True)
        with self._lock:
            self.instance_id = self.name = instance_id
        api.say(f"{instance_id}: started to replace a lost node", self.fleet.progress)
        (instance,) = self.fleet.wait_running([instance_id], self.deadline, self._closed)
        self.address = self.fleet.resolve_address(instance)

    def _wait_for_ssh(self, address: Address, deadline: float) -> None:
        host, port = address
        error: OSError | None = None
        for left in retries(deadline, self.fleet.poll, stop=self._closed):
            try:
                with socket.create_connection((host, port), timeout=max(0.1, min(5, left))):
                    return
            except OSError as exc:
                error = exc
        if self._closed.is_set():
            raise _ShuttingDown(f"{self.name}: the cluster is shutting down")
        raise TimeoutError(
            f"{self.name}: SSH on {host}:{port} not reachable before the start "
            f"deadline ({error}); check that sky.AWS(ssh_cidr=...) includes this "
            "client's public address and that the subnet gives public IPs"
        ) from error

    def abort(self) -> None:
        """Make an :meth:`open` in progress fail soon, at any step: waiting for the
        instance to run, for SSH, for the host key, or bootstrapping (its SSH
        connection is closed). A ``run_instances`` call in flight ends first (bounded);
        the instance it starts is terminated, or removed by the teardown."""
        self.close()

    def close(self) -> None:
        """Close the SSH connection and end any wait of :meth:`open` (idempotent)."""
        with self._lock:
            self._closed.set()
            host = self._host
        if host is not None:
            host.close()
