"""The ``sky.AWS`` provider: creates a cluster's key pair, security group and instances,
waits for them, and opens each node over SSH like ``sky.SSH``."""

from __future__ import annotations

import functools
import ipaddress
import os
import time
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

from skyward.agent import spot
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
from skyward.providers.aws.fleet import AddressResolver, Fleet
from skyward.providers.aws.keys import Address, KeyPair
from skyward.providers.aws.teardown import ClusterResources, remove_cluster
from skyward.providers.aws.userdata import REMOTE_PYTHON, render_user_data

__all__ = ["AWS", "checkip", "public_address"]


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
            above this. A node's replacement keeps the node count, so it is not refused.
        spot_endpoint: advanced/tests: the metadata service spot agents poll for the
            interruption notice (default: the instance's own, ``http://169.254.169.254``).

    A lost node (silent, its agent gone, or its spot instance reclaimed) is replaced
    within ``Compute(restarts=...)`` by a new instance of the same spec: its own
    instance is terminated first, and the new one counts in the cost from its start.
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
        spot_endpoint: str = spot.IMDS,
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
        self.spot_endpoint = spot_endpoint
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
            "KeyName": name,
            "UserData": render_user_data(
                spec.image.python, self.idle_shutdown_minutes, self.max_lifetime_hours, self.user
            ),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1,
            },
            "TagSpecifications": api.tags("instance", cluster_id) + api.tags("volume", cluster_id),
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
        host_options: dict[str, Any] = {
            "username": self.user,
            "image": spec.image,
            "pkey": login.pkey,
            "python": self.python,
        }
        if self.env_root is not None:
            host_options["env_root"] = self.env_root
        # A replacement keeps the node count, so the estimate above still holds for it;
        # its own instance-hours are added to the cost as it runs.
        fleet = Fleet(
            ec2, cluster_id, run_args, created, RunCost(cost), self.resolve_address,
            host_options, self.start_timeout, self.poll_interval, self.progress,
        )  # fmt: skip
        ids = fleet.run(spec.nodes)
        self._runs[cluster_id] = fleet.cost
        cleanup.callback(self._end_run, cluster_id)  # runs before the teardown
        cleanup.callback(fleet.close)  # and this before both
        return [fleet.launcher(i, deadline) for i in fleet.wait_running(ids, deadline)]

    def agent_config(self) -> dict[str, Any]:
        """Spot instances: the agents watch the metadata service for the reclaim notice."""
        return {"spot_endpoint": self.spot_endpoint} if self.spot else {}

    def summary(self, cluster_id: str) -> str | None:
        """Instance-hours and estimated cost of the cluster so far (for the exit summary)."""
        run = self._runs.get(cluster_id)
        return None if run is None else str(run)

    def _end_run(self, cluster_id: str) -> None:
        run = self._runs.pop(cluster_id, None)
        if run is not None:
            api.say(f"cluster {cluster_id}: {run}", self.progress)


def _ssh_rule(cidr: str) -> dict[str, Any]:
    network = ipaddress.ip_network(cidr, strict=False)
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    if network.version == 6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": str(network), "Description": "skyward client"}]
    else:
        rule["IpRanges"] = [{"CidrIp": str(network), "Description": "skyward client"}]
    return rule
