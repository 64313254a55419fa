"""The ``sky.AWS`` provider: creates a cluster's key pair, security group and instances,
waits for them, and opens each node over SSH like ``sky.SSH``."""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from skyward.agent import spot
from skyward.channel import Channel
from skyward.errors import NodeStartError
from skyward.providers import ClusterSpec, Launcher, Provider
from skyward.providers.aws import ec2 as api
from skyward.providers.aws.catalog import (
    ARCHITECTURES,
    DEFAULT_AMI_PARAMETER,
    Architecture,
    RunCost,
    estimate_cost,
    instance_architecture,
    pick_instance_type,
    resolve_ami,
)
from skyward.providers.aws.keys import Address, KeyPair, console_host_key, pinned_host_keys
from skyward.providers.aws.teardown import ClusterResources, remove_cluster
from skyward.providers.aws.userdata import REMOTE_PYTHON, SETUP_PENDING, render_user_data
from skyward.waits import retries

if TYPE_CHECKING:
    import paramiko

    from skyward.providers.ssh import HostLauncher

__all__ = ["AWS", "checkip", "public_address"]

AddressResolver = Callable[[Mapping[str, Any]], Address]


def checkip(timeout: float = 10.0) -> str:
    """This client's public address as a /32 (or /128) CIDR, from checkip.amazonaws.com."""
    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=timeout) as reply:
            text = reply.read(100).decode().strip()
        ip = ipaddress.ip_address(text)
    except (OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not find this client's public IP address ({exc}): pass "
            "sky.AWS(ssh_cidr='203.0.113.7/32') with the address allowed to reach port 22"
        ) from exc
    return f"{ip}/{ip.max_prefixlen}"


def public_address(instance: Mapping[str, Any]) -> Address:
    """Default address resolver: the instance's public IP (else private IP), port 22."""
    host = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
    if not host:
        raise RuntimeError(f"instance {instance.get('InstanceId')} has no IP address")
    return str(host), 22


class AWS(Provider):
    """Run each node on a fresh EC2 instance, removed when the cluster ends.

    Args:
        region: AWS region (default: the session's configured region).
        instance_type: EC2 type for every node; default: the cheapest type with
            ``Compute(vcpus=..., memory=...)`` (see :func:`pick_instance_type`).
        ami: image id; default: the latest Amazon Linux 2023 from ``ami_parameter``.
        spot: request spot instances (cheaper, may be reclaimed; lost nodes' tasks rerun).
        subnet_id: launch into this subnet (its VPC gets the security group); default:
            the default VPC.
        ssh_cidr: addresses allowed to reach port 22; default: this client's public /32
            (looked up with ``public_ip_lookup``).
        user: login user of the AMI (``ec2-user`` on Amazon Linux, ``ubuntu`` on Ubuntu).
        arch: CPU architecture when the instance type is chosen for you.
        idle_shutdown_minutes: the dead-man switch: an instance powers itself off (and so
            terminates) after this long without a logged-in client.
        max_lifetime_hours: the hard limit: an instance powers itself off this long after
            it booted, whatever happens (armed first thing at boot).
        start_timeout: seconds allowed for the instances to run and accept SSH.
        teardown_timeout: seconds allowed for termination and deletion at the end.
        poll_interval: seconds between EC2 state polls.
        progress: print provisioning progress on stderr.
        session: a ``boto3.Session`` (default: a new one from the environment).
        endpoint_url: EC2/SSM endpoint override (e.g. a local test server).
        ami_parameter: public SSM parameter naming the AMI (``{arch}`` is substituted).
        python: interpreter on the instance; default: the one user data installs.
        env_root: folder on the instance holding the environments (default: sky.SSH's).
        resolve_address: advanced/tests: instance description -> ``(host, port)`` to SSH to
            (default :func:`public_address`).
        ssh_key: advanced/tests: path of a private key to log in with (and to import as
            the key pair) instead of a fresh per-cluster key.
        public_ip_lookup: advanced/tests: returns this client's CIDR when ``ssh_cidr`` is
            not given (default :func:`checkip`).
        max_hourly_cost: refuse, before creating anything, a cluster whose estimated cost
            (USD per hour, see :class:`~skyward.providers.aws.catalog.CostEstimate`) is
            above this.
    """

    def __init__(
        self,
        region: str | None = None,
        instance_type: str | None = None,
        ami: str | None = None,
        spot: bool = False,
        subnet_id: str | None = None,
        ssh_cidr: str | None = None,
        *,
        user: str = "ec2-user",
        arch: Architecture = "x86_64",
        idle_shutdown_minutes: float = 15.0,
        max_lifetime_hours: float = 12.0,
        start_timeout: float = 600.0,
        teardown_timeout: float = 300.0,
        poll_interval: float = 5.0,
        progress: bool = True,
        session: Any = None,
        endpoint_url: str | None = None,
        ami_parameter: str = DEFAULT_AMI_PARAMETER,
        python: str = REMOTE_PYTHON,
        env_root: str | None = None,
        resolve_address: AddressResolver = public_address,
        ssh_key: str | os.PathLike[str] | None = None,
        public_ip_lookup: Callable[[], str] = checkip,
        max_hourly_cost: float | None = None,
    ) -> None:
        api.boto3_module()
        if arch not in ARCHITECTURES:
            raise ValueError(f"sky.AWS(arch={arch!r}) must be 'x86_64' or 'arm64'")
        if ssh_cidr is not None:
            try:
                ipaddress.ip_network(ssh_cidr, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"sky.AWS(ssh_cidr={ssh_cidr!r}) is not a CIDR: use e.g. '203.0.113.7/32'"
                ) from exc
        for name, value in [
            ("idle_shutdown_minutes", idle_shutdown_minutes),
            ("max_lifetime_hours", max_lifetime_hours),
            ("start_timeout", start_timeout),
            ("teardown_timeout", teardown_timeout),
            ("poll_interval", poll_interval),
        ]:
            if not value > 0:
                raise ValueError(f"sky.AWS({name}={value!r}) must be > 0")
        if max_hourly_cost is not None and not max_hourly_cost > 0:
            raise ValueError(f"sky.AWS(max_hourly_cost={max_hourly_cost!r}) must be > 0 or None")
        self.region = region
        self.instance_type = instance_type
        self.ami = ami
        self.spot = spot
        self.subnet_id = subnet_id
        self.ssh_cidr = ssh_cidr
        self.user = user
        self.arch: Architecture = arch
        self.idle_shutdown_minutes = idle_shutdown_minutes
        self.max_lifetime_hours = max_lifetime_hours
        self.start_timeout = start_timeout
        self.teardown_timeout = teardown_timeout
        self.poll_interval = poll_interval
        self.progress = progress
        self.session = session
        self.endpoint_url = endpoint_url
        self.ami_parameter = ami_parameter
        self.python = python
        self.env_root = env_root
        self.resolve_address = resolve_address
        self.ssh_key = KeyPair.load(ssh_key) if ssh_key is not None else None
        self.public_ip_lookup = public_ip_lookup
        self.max_hourly_cost = max_hourly_cost
        self._runs: dict[str, RunCost] = {}

    def __repr__(self) -> str:
        return (
            f"AWS(region={self.region!r}, instance_type={self.instance_type!r}, "
            f"ami={self.ami!r}, spot={self.spot!r})"
        )

    def _clients(self) -> tuple[Any, Any]:
        session, region = api.session_and_region(self.session, self.region)
        if session.get_credentials() is None:
            raise RuntimeError(
                "no AWS credentials found: run `aws configure` (or `aws sso login`), or set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        return (
            api.client(session, "ec2", region, self.endpoint_url),
            api.client(session, "ssm", region, self.endpoint_url),
        )

    def check(self, spec: ClusterSpec) -> None:
        """Fail before creating anything when boto3, the region or credentials are missing."""
        self._clients()

    def launch(self, spec: ClusterSpec, cleanup: ExitStack) -> list[Launcher]:
        """Create the cluster's key pair, security group and instances; wait until running."""
        ec2, ssm = self._clients()
        cluster_id = spec.cluster_id
        created = ClusterResources()
        # Registered first, so an interruption at any later point still removes everything.
        teardown = functools.partial(
            remove_cluster, ec2, cluster_id, created, timeout=self.teardown_timeout,
            poll=self.poll_interval, progress=self.progress,
        )  # fmt: skip
        cleanup.callback(teardown)
        deadline = time.monotonic() + self.start_timeout
        if self.instance_type is not None:
            instance_type = self.instance_type
            arch = instance_architecture(ec2, instance_type)
        else:
            arch = self.arch
            instance_type = pick_instance_type(ec2, spec.vcpus, spec.memory, arch, self.spot)
        cost = estimate_cost(ec2, instance_type, spec.nodes, self.spot)
        api.say(f"cluster {cluster_id}: {cost}", self.progress)
        cost.enforce(self.max_hourly_cost)  # before anything is created
        ami = self.ami or resolve_ami(ssm, self.ami_parameter.format(arch=arch))
        cidr = self.ssh_cidr or self.public_ip_lookup()
        login = self.ssh_key or KeyPair.generate()
        api.say(
            f"cluster {cluster_id}: starting {spec.nodes} x {instance_type}"
            f"{' (spot)' if self.spot else ''} from {ami}, SSH from {cidr}",
            self.progress,
        )

        name = f"skyward-{cluster_id}"
        ec2.import_key_pair(
            KeyName=name, PublicKeyMaterial=login.public.encode(),
            TagSpecifications=api.tags("key-pair", cluster_id),
        )  # fmt: skip
        # Recorded once it is ours: a failed import (the name taken) must not make the
        # teardown delete someone else's key pair.
        created.key_names.append(name)
        group_args: dict[str, Any] = {}
        if self.subnet_id is not None:
            subnet = ec2.describe_subnets(SubnetIds=[self.subnet_id])["Subnets"][0]
            group_args["VpcId"] = subnet["VpcId"]
        group_id = ec2.create_security_group(
            GroupName=name,
            Description=f"Skyward cluster {cluster_id}: SSH from the client only",
            TagSpecifications=api.tags("security-group", cluster_id),
            **group_args,
        )["GroupId"]
        created.group_ids.append(group_id)
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[_ssh_rule(cidr)])

        run_args: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": instance_type,
            "MinCount": spec.nodes,
            "MaxCount": spec.nodes,
            "KeyName": name,
            "UserData": render_user_data(
                spec.image.python, self.idle_shutdown_minutes, self.max_lifetime_hours, self.user
            ),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1,
            },
            "TagSpecifications": api.tags("instance", cluster_id) + api.tags("volume", cluster_id),
            # Idempotent: a retried request (lost reply) cannot start a second set.
            "ClientToken": f"skyward-{cluster_id}-{secrets.token_hex(8)}",
        }  # fmt: skip
        if self.subnet_id is not None:
            run_args["NetworkInterfaces"] = [{
                "DeviceIndex": 0, "SubnetId": self.subnet_id, "Groups": [group_id],
                "AssociatePublicIpAddress": True,
            }]  # fmt: skip
        else:
            run_args["SecurityGroupIds"] = [group_id]
        if self.spot:
            run_args["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate",
                },
            }  # fmt: skip
        try:
            reply = ec2.run_instances(**run_args)
        except Exception as exc:
            code = api.error_code(exc)
            if not code:
                raise
            raise RuntimeError(
                f"EC2 did not start {spec.nodes} x {instance_type} from {ami}: {exc}"
                f"{_RUN_HINTS.get(code, '')}; the cluster is being removed"
            ) from exc
        created.instance_ids.extend(i["InstanceId"] for i in reply["Instances"])
        self._runs[cluster_id] = RunCost(cost)
        cleanup.callback(self._end_run, cluster_id)  # runs before the teardown

        instances = self._wait_running(ec2, created.instance_ids, deadline)
        launchers: list[Launcher] = []
        for instance in instances:
            address = self.resolve_address(instance)
            host_options: dict[str, Any] = {
                "username": self.user,
                "image": spec.image,
                "pkey": login.pkey,
                "python": self.python,
            }
            if self.env_root is not None:
                host_options["env_root"] = self.env_root
            launcher = _EC2Launcher(
                ec2,
                instance["InstanceId"],
                address,
                deadline,
                self.poll_interval,
                self.progress,
                host_options,
            )
            cleanup.callback(launcher.close)
            launchers.append(launcher)
        return launchers

    def agent_config(self) -> dict[str, Any]:
        """Spot instances: the agents watch the metadata service for the reclaim notice."""
        return {"spot_endpoint": spot.IMDS} if self.spot else {}

    def summary(self, cluster_id: str) -> str | None:
        """Instance-hours and estimated cost of the cluster so far (for the exit summary)."""
        run = self._runs.get(cluster_id)
        return None if run is None else str(run)

    def _end_run(self, cluster_id: str) -> None:
        run = self._runs.pop(cluster_id, None)
        if run is not None:
            api.say(f"cluster {cluster_id}: {run}", self.progress)

    def _wait_running(self, ec2: Any, ids: list[str], deadline: float) -> list[dict[str, Any]]:
        started = time.monotonic()
        shown: dict[str, int] | None = None
        states: dict[str, str] = {}
        for _ in retries(deadline, self.poll_interval):
            found = {i["InstanceId"]: i for i in api.describe_instances(ec2, InstanceIds=ids)}
            states = {i: found[i]["State"]["Name"] if i in found else "requested" for i in ids}
            for instance_id, state in states.items():
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    reason = found[instance_id].get("StateReason", {}).get("Message", "")
                    raise RuntimeError(
                        f"EC2 instance {instance_id} went {state} while starting"
                        f"{f' ({reason})' if reason else ''}; the cluster is being removed"
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
        pending = sorted(i for i, s in states.items() if s != "running")
        raise TimeoutError(
            f"EC2 instances still not running after {self.start_timeout:.0f}s "
            f"({', '.join(f'{i}: {states[i]}' for i in pending)}); the cluster is "
            "being removed. Raise sky.AWS(start_timeout=...) or check the EC2 console"
        )


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


def _ssh_rule(cidr: str) -> dict[str, Any]:
    network = ipaddress.ip_network(cidr, strict=False)
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    if network.version == 6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": str(network), "Description": "skyward client"}]
    else:
        rule["IpRanges"] = [{"CidrIp": str(network), "Description": "skyward client"}]
    return rule


_REOPEN_TIMEOUT = 120.0  # seconds for a restarted node to reach its (running) instance again


class _EC2Launcher(Launcher):
    """Wait for one instance's SSH port and its host key on its console, then open it like
    any SSH host, with only that key trusted.

    While the instance's user data is still installing Python, the interpreter wrapper
    answers :data:`SETUP_PENDING`; the launcher retries until the start deadline.
    """

    def __init__(
        self,
        ec2: Any,
        name: str,
        address: Address,
        deadline: float,
        poll: float,
        progress: bool,
        host_options: dict[str, Any],
    ) -> None:
        self.ec2 = ec2
        self.name = name
        self.address = address
        self.deadline = deadline
        self.poll = poll
        self.progress = progress
        self.host_options = host_options
        self._host: HostLauncher | None = None
        self._host_key: paramiko.PKey | None = None
        self._opened = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def open(self) -> Channel:
        from skyward.providers.ssh import HostLauncher

        with self._lock:
            # A restart of a lost node opens again: drop the old connection, allow new time.
            previous, self._host = self._host, None
            first = self._opened == 0
            self._opened += 1
        if previous is not None:
            previous.close()
        deadline = self.deadline if first else time.monotonic() + _REOPEN_TIMEOUT
        self._wait_for_ssh(deadline)
        if self._host_key is None:
            api.say(f"{self.name}: reading its SSH host key from its console", self.progress)
            self._host_key = console_host_key(
                self.ec2, self.name, deadline, self.poll, self._closed
            )
        pinned = pinned_host_keys(self.address, self._host_key)
        host, port = self.address
        pending: NodeStartError | None = None
        for _ in retries(deadline, self.poll, stop=self._closed):
            if pending is not None:
                api.say(f"{self.name}: instance still installing Python; retrying", self.progress)
            launcher = HostLauncher(self.name, host, port, host_keys=pinned, **self.host_options)
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
            raise RuntimeError(f"{self.name}: the cluster is shutting down")
        raise pending

    def _wait_for_ssh(self, deadline: float) -> None:
        host, port = self.address
        error: OSError | None = None
        for left in retries(deadline, self.poll, stop=self._closed):
            try:
                with socket.create_connection((host, port), timeout=max(0.1, min(5, left))):
                    return
            except OSError as exc:
                error = exc
        if self._closed.is_set():
            raise RuntimeError(f"{self.name}: the cluster is shutting down")
        raise TimeoutError(
            f"{self.name}: SSH on {host}:{port} not reachable before the start "
            f"deadline ({error}); check that sky.AWS(ssh_cidr=...) includes this "
            "client's public address and that the subnet gives public IPs"
        ) from error

    def close(self) -> None:
        """Close the SSH connection (idempotent)."""
        with self._lock:
            self._closed.set()
            host = self._host
        if host is not None:
            host.close()
