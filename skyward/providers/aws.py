"""``sky.AWS()``: EC2 instances as nodes, created per cluster and removed on every exit path.

For each ``Compute`` the provider creates, all tagged ``skyward:cluster=<id>``:

- an SSH key pair generated on the client (the private key never leaves memory),
- a security group whose only ingress is TCP 22 from the client's public address,
- the instances, with ``InstanceInitiatedShutdownBehavior="terminate"``, IMDSv2 only,
  and cloud-init user data that installs a client-generated SSH host key (pinned by
  the client before its first connection), uv and the image's Python, and a dead-man
  switch that powers the instance off once no client has been connected for
  ``idle_shutdown_minutes``.

Each node is then reached through :class:`skyward.providers.ssh.HostLauncher`, the
same SSH channel and bootstrap as ``sky.SSH``. Teardown (terminate, wait, delete the
security group and key pair) is registered before anything is created, finds the
cluster's resources by tag, and runs to completion even through a second Ctrl-C.
``python -m skyward aws cleanup`` removes whatever a killed client left behind.

boto3 is imported only here, and only when the provider is used (``skyward[aws]``).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import paramiko

from skyward.channel import Channel
from skyward.providers import ClusterSpec, Launcher, Provider

if TYPE_CHECKING:
    import argparse

    from skyward.providers.ssh import HostLauncher

__all__ = [
    "AWS",
    "AWSCleanupError",
    "ClusterResources",
    "KeyPair",
    "PRICE_PER_VCPU_HOUR",
    "TAG",
    "checkip",
    "cleanup",
    "cli",
    "destroy_cluster",
    "pick_instance_type",
    "public_address",
    "render_user_data",
    "resolve_ami",
]

log = logging.getLogger("skyward.aws")

TAG = "skyward:cluster"
"""Tag key on every resource Skyward creates; the value is the cluster id."""

INSTALL_HINT = "pip install 'skyward[aws]'"
DEFAULT_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
REMOTE_PYTHON = "/usr/local/bin/skyward-python"
_LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]

Architecture = Literal["x86_64", "arm64"]
ARCHITECTURES: tuple[Architecture, ...] = ("x86_64", "arm64")  # in order of preference
Address = tuple[str, int]
AddressResolver = Callable[[Mapping[str, Any]], Address]

# Approximate us-east-1 Linux on-demand prices in USD per vCPU-hour (the ".large" size's
# price / 2; within these families the price scales with the vCPU count). Used only to
# rank instance types; other regions keep roughly the same order.
PRICE_PER_VCPU_HOUR: dict[str, float] = {
    # x86_64
    "c6a": 0.03825, "c5a": 0.0385, "c6i": 0.0425, "c5": 0.0425, "c7i": 0.044625,
    "c7a": 0.05132, "m6a": 0.0432, "m5a": 0.043, "m6i": 0.048, "m5": 0.048,
    "m7i": 0.0504, "m7a": 0.05796, "r5a": 0.0565, "r6a": 0.0567, "r6i": 0.063,
    "r5": 0.063, "r7i": 0.06615, "r7a": 0.076075,
    # arm64 (Graviton)
    "c6g": 0.034, "c7g": 0.03625, "m6g": 0.0385, "m7g": 0.0408, "r6g": 0.0504,
    "r7g": 0.05355,
}  # fmt: skip


class AWSCleanupError(RuntimeError):
    """Some AWS resources of a cluster could not be removed (the message says which)."""


def _boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise ImportError(f"sky.AWS needs boto3, which is not installed: {INSTALL_HINT}") from exc
    return boto3


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _client(session: Any, service: str, region: str, endpoint_url: str | None) -> Any:
    from botocore.config import Config

    config = Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 5}
    )
    return session.client(service, region_name=region, endpoint_url=endpoint_url, config=config)


def _session(session: Any, region: str | None) -> tuple[Any, str]:
    boto3 = _boto3()
    session = session if session is not None else boto3.Session(region_name=region)
    region = region or session.region_name
    if not region:
        raise ValueError(
            "no AWS region configured: pass sky.AWS(region='us-east-1'), set "
            "AWS_DEFAULT_REGION, or run `aws configure`"
        )
    return session, region


def _say(message: str, progress: bool = True) -> None:
    log.info("%s", message)
    if progress:
        try:
            sys.stderr.write(f"skyward: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _tags(resource_type: str, cluster_id: str) -> list[dict[str, Any]]:
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    tags = [
        {"Key": TAG, "Value": cluster_id},
        {"Key": "skyward:created", "Value": created},
        {"Key": "Name", "Value": f"skyward-{cluster_id}"},
    ]
    return [{"ResourceType": resource_type, "Tags": tags}]


# --- keys -------------------------------------------------------------------------------------


_CLOUD_INIT_KEY_KINDS = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa"}


@dataclass(frozen=True)
class KeyPair:
    """An SSH key pair held in memory: the OpenSSH private key text and its paramiko key."""

    private: str = field(repr=False)
    pkey: paramiko.PKey = field(repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh Ed25519 key pair."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        text = (
            ed25519.Ed25519PrivateKey.generate()
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            .decode()
        )
        return cls(text, paramiko.Ed25519Key(file_obj=io.StringIO(text)))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read an unencrypted private key file (OpenSSH or PEM format)."""
        path = Path(path).expanduser()
        return cls(path.read_text(), paramiko.PKey.from_path(path))

    @property
    def public(self) -> str:
        """The public key as one ``authorized_keys`` line: ``<type> <base64>``."""
        return f"{self.pkey.get_name()} {self.pkey.get_base64()}"

    @property
    def cloud_init_kind(self) -> str:
        """The key type as cloud-init's ``ssh_keys`` names it (``ed25519``, ``rsa``, ``ecdsa``)."""
        name = self.pkey.get_name()
        if name.startswith("ecdsa-"):
            return "ecdsa"
        if name not in _CLOUD_INIT_KEY_KINDS:
            raise ValueError(f"unsupported SSH host key type {name!r}: use ed25519, rsa or ecdsa")
        return _CLOUD_INIT_KEY_KINDS[name]


def pinned_host_keys(address: Address, host_key: paramiko.PKey) -> paramiko.HostKeys:
    """Known hosts holding only ``host_key`` for ``address``, as ssh looks it up."""
    host, port = address
    keys = paramiko.HostKeys()
    keys.add(host if port == 22 else f"[{host}]:{port}", host_key.get_name(), host_key)
    return keys


# --- user data --------------------------------------------------------------------------------


_DEADMAN = """\
#!/bin/sh
# Skyward dead-man switch: power the instance off (which terminates it) once no client
# has been connected for $1 seconds. "Connected" means an agent process is running (an
# agent exits when its client stops sending heartbeats) or an SSH connection is
# established (sshd drops a vanished client after ~1 min of missed keepalives).
idle="$1"
last=$(date +%s)
while sleep 15; do
  now=$(date +%s)
  if pgrep -f 'skyward[.]agent' >/dev/null 2>&1 \\
     || ss -Htn state established '( sport = :22 )' 2>/dev/null | grep -q .; then
    last=$now
  fi
  if [ $((now - last)) -ge "$idle" ]; then
    logger -t skyward "no client for ${idle}s: powering off"
    systemctl poweroff
    exit 0
  fi
done
"""

_DEADMAN_UNIT = """\
[Unit]
Description=Skyward dead-man switch (powers off when the client is gone)

[Service]
ExecStart=/usr/local/sbin/skyward-deadman {seconds}
Restart=always

[Install]
WantedBy=multi-user.target
"""

_SETUP = """\
#!/bin/sh
# Install uv and Python {python} for Skyward; the wrapper {wrapper} waits for this.
set -eu
mkdir -p {state}
trap '[ -e {state}/ready ] || echo "skyward: instance set-up failed" > {state}/failed' EXIT
export HOME=/root UV_PYTHON_INSTALL_DIR=/opt/skyward/python
curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=/usr/local/bin \
UV_NO_MODIFY_PATH=1 sh
/usr/local/bin/uv python install {python}
/usr/local/bin/uv python find {python} > {state}/python
chmod -R a+rX /opt/skyward {state}
touch {state}/ready
"""

_WRAPPER = """\
#!/bin/sh
# Skyward's Python on this instance: runs once the user-data set-up is done. Waits up to
# {wait}s per call (less than the client's probe timeout); the client retries while the
# marker below says the set-up is still running.
n=0
while [ ! -e {state}/ready ]; do
  if [ -e {state}/failed ]; then
    cat {state}/failed >&2
    tail -n 20 /var/log/cloud-init-output.log >&2 2>/dev/null
    exit 1
  fi
  n=$((n + 1))
  if [ "$n" -gt {wait} ]; then
    echo "{pending}" >&2
    exit 75
  fi
  sleep 1
done
exec "$(cat {state}/python)" "$@"
"""

SETUP_PENDING = "skyward: instance set-up still running"
STATE_DIR = "/var/lib/skyward"


def render_wrapper(state_dir: str = STATE_DIR, wait_seconds: int = 45) -> str:
    """The interpreter wrapper installed at :data:`REMOTE_PYTHON` by the user data.

    It runs ``$(cat <state_dir>/python)`` once ``<state_dir>/ready`` exists, reports a
    failed set-up, or exits with :data:`SETUP_PENDING` on stderr after ``wait_seconds``.
    """
    return _WRAPPER.format(state=state_dir, wait=wait_seconds, pending=SETUP_PENDING)


_SSHD_DROP_IN = """\
# Skyward: keys only; drop a vanished client within ~1 min so the dead-man switch sees it.
PasswordAuthentication no
ClientAliveInterval 15
ClientAliveCountMax 4
"""


def render_user_data(host_key: KeyPair, python: str, idle_shutdown_minutes: float) -> str:
    """The instance's cloud-init user data (``#cloud-config`` in JSON, a subset of YAML).

    It installs ``host_key`` as the only SSH host key, arms the dead-man switch first,
    then installs uv and Python ``python`` behind :data:`REMOTE_PYTHON`.
    """
    kind = host_key.cloud_init_kind
    seconds = max(60, round(idle_shutdown_minutes * 60))
    config = {
        "ssh_deletekeys": True,
        "ssh_genkeytypes": [],
        "ssh_keys": {f"{kind}_private": host_key.private, f"{kind}_public": host_key.public},
        "disable_root": True,
        "write_files": [
            {"path": "/usr/local/sbin/skyward-deadman", "permissions": "0755",
             "content": _DEADMAN},
            {"path": "/etc/systemd/system/skyward-deadman.service", "permissions": "0644",
             "content": _DEADMAN_UNIT.format(seconds=seconds)},
            {"path": "/etc/ssh/sshd_config.d/60-skyward.conf", "permissions": "0644",
             "content": _SSHD_DROP_IN},
            {"path": "/usr/local/sbin/skyward-setup", "permissions": "0755",
             "content": _SETUP.format(python=python, wrapper=REMOTE_PYTHON, state=STATE_DIR)},
            {"path": REMOTE_PYTHON, "permissions": "0755", "content": render_wrapper()},
        ],
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", "skyward-deadman.service"],
            ["/usr/local/sbin/skyward-setup"],
        ],
    }  # fmt: skip
    return "#cloud-config\n" + json.dumps(config, indent=1) + "\n"


# --- choosing what to run ---------------------------------------------------------------------


_catalogue: dict[str, list[dict[str, Any]]] = {}
_catalogue_lock = threading.Lock()


def _all_instance_types(ec2: Any, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # The catalogue is large (1000+ types) and fixed per region: fetch it once per process.
    key = json.dumps([ec2.meta.region_name, ec2.meta.endpoint_url, filters], sort_keys=True)
    with _catalogue_lock:
        if key not in _catalogue:
            pages = ec2.get_paginator("describe_instance_types").paginate(Filters=filters)
            _catalogue[key] = [t for page in pages for t in page["InstanceTypes"]]
        return _catalogue[key]


def _fits(info: Mapping[str, Any], vcpus: int, memory_gib: float) -> bool:
    return (
        info["VCpuInfo"]["DefaultVCpus"] >= vcpus
        and info["MemoryInfo"]["SizeInMiB"] >= memory_gib * 1024
    )


def pick_instance_type(
    ec2: Any,
    vcpus: int | None = None,
    memory: float | None = None,
    arch: Architecture = "x86_64",
    spot: bool = False,
) -> str:
    """The cheapest instance type with at least ``vcpus`` vCPUs and ``memory`` GiB.

    Rule: among the families of :data:`PRICE_PER_VCPU_HOUR` offered in the region, the
    lowest ``price per vCPU-hour x vCPUs`` wins (ties: less memory, then name). When no
    priced family fits, any other non-bare-metal type of ``arch`` with fewest vCPUs, then
    least memory, then current generation first. With no size given: 2 vCPUs.
    """
    need_cpus, need_mem = vcpus or 2, memory or 0.0
    base = [
        {"Name": "processor-info.supported-architecture", "Values": [arch]},
        {"Name": "bare-metal", "Values": ["false"]},
        {"Name": "supported-usage-class", "Values": ["spot" if spot else "on-demand"]},
    ]
    families = [f"{family}.*" for family in PRICE_PER_VCPU_HOUR]
    priced = [
        t
        for t in _all_instance_types(ec2, [*base, {"Name": "instance-type", "Values": families}])
        if _fits(t, need_cpus, need_mem) and t["InstanceType"].split(".")[0] in PRICE_PER_VCPU_HOUR
    ]
    if priced:
        best = min(
            priced,
            key=lambda t: (
                PRICE_PER_VCPU_HOUR[t["InstanceType"].split(".")[0]]
                * t["VCpuInfo"]["DefaultVCpus"],
                t["MemoryInfo"]["SizeInMiB"],
                t["InstanceType"],
            ),
        )
        return str(best["InstanceType"])
    others = [t for t in _all_instance_types(ec2, base) if _fits(t, need_cpus, need_mem)]
    if not others:
        raise ValueError(
            f"no {arch} EC2 instance type has {need_cpus} vCPUs and {need_mem:g} GiB of memory "
            "in this region: lower Compute(vcpus=..., memory=...) or pass "
            "sky.AWS(instance_type=...)"
        )
    best = min(
        others,
        key=lambda t: (
            t["VCpuInfo"]["DefaultVCpus"],
            t["MemoryInfo"]["SizeInMiB"],
            not t.get("CurrentGeneration", False),
            t["InstanceType"],
        ),
    )
    return str(best["InstanceType"])


def _instance_type_info(ec2: Any, instance_type: str) -> dict[str, Any]:
    try:
        found = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except Exception as exc:
        if "InvalidInstanceType" in _error_code(exc):
            found = []
        else:
            raise
    if not found:
        raise ValueError(
            f"sky.AWS(instance_type={instance_type!r}): no such EC2 instance type in this "
            "region (e.g. 'c6a.large', 'm7i.2xlarge')"
        )
    return dict(found[0])


def instance_architecture(ec2: Any, instance_type: str) -> Architecture:
    """The architecture of the image for ``instance_type``: ``x86_64`` if it supports it,
    else ``arm64`` (t2 types also list ``i386``, for which there is no current image)."""
    supported = _instance_type_info(ec2, instance_type)["ProcessorInfo"]["SupportedArchitectures"]
    for arch in ARCHITECTURES:
        if arch in supported:
            return arch
    raise ValueError(
        f"sky.AWS(instance_type={instance_type!r}) supports {', '.join(supported)}: Skyward "
        "runs on x86_64 or arm64 instances; choose another instance type"
    )


def resolve_ami(ssm: Any, parameter: str) -> str:
    """The AMI id stored in the public SSM ``parameter`` (e.g. the latest Amazon Linux)."""
    try:
        return str(ssm.get_parameter(Name=parameter)["Parameter"]["Value"])
    except Exception as exc:
        if _error_code(exc) == "ParameterNotFound":
            raise ValueError(
                f"SSM parameter {parameter!r} does not exist in this region: pass "
                "sky.AWS(ami='ami-...') or another ami_parameter=..."
            ) from exc
        raise


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


# --- teardown ---------------------------------------------------------------------------------


def _tag_filter(cluster_id: str | None) -> dict[str, Any]:
    if cluster_id is None:
        return {"Name": "tag-key", "Values": [TAG]}
    return {"Name": f"tag:{TAG}", "Values": [cluster_id]}


def _tag_value(resource: Mapping[str, Any]) -> str | None:
    for tag in resource.get("Tags", []):
        if tag.get("Key") == TAG:
            return str(tag.get("Value"))
    return None


def _describe_instances(ec2: Any, **kwargs: Any) -> list[dict[str, Any]]:
    try:
        pages = ec2.get_paginator("describe_instances").paginate(**kwargs)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    except Exception as exc:
        if _error_code(exc) == "InvalidInstanceID.NotFound":
            return []
        raise


def _live_instances(ec2: Any, cluster_id: str | None) -> list[dict[str, Any]]:
    filters = [_tag_filter(cluster_id), {"Name": "instance-state-name", "Values": _LIVE_STATES}]
    return _describe_instances(ec2, Filters=filters)


@dataclass
class ClusterResources:
    """Ids of what a client created for one cluster (tags find the rest)."""

    instance_ids: list[str] = field(default_factory=list)
    group_ids: list[str] = field(default_factory=list)
    key_names: list[str] = field(default_factory=list)


def destroy_cluster(
    ec2: Any,
    cluster_id: str,
    *,
    known: ClusterResources | None = None,
    timeout: float = 300.0,
    poll: float = 2.0,
    progress: bool = True,
) -> list[str]:
    """Terminate the cluster's instances, wait for them, delete its security groups and key pairs.

    Resources are found by the cluster tag, plus any ``known`` ids (tags may lag behind a
    fresh ``run_instances``). Returns what was removed; raises :class:`AWSCleanupError`
    naming what is left after ``timeout`` seconds.
    """
    known = known or ClusterResources()
    deadline = time.monotonic() + timeout
    removed: list[str] = []
    ids = {i["InstanceId"] for i in _live_instances(ec2, cluster_id)}
    if known.instance_ids:
        seen = {
            i["InstanceId"]: i["State"]["Name"]
            for i in _describe_instances(ec2, InstanceIds=known.instance_ids)
        }
        # An id not visible yet (eventual consistency) may still be starting: include it.
        ids |= {i for i in known.instance_ids if seen.get(i) != "terminated"}
    if ids:
        _say(f"terminating {len(ids)} instance(s) of cluster {cluster_id}", progress)
        _terminate(ec2, sorted(ids))
        left = _wait_terminated(ec2, sorted(ids), deadline, poll)
        if left:
            raise AWSCleanupError(_leftover_message(cluster_id, f"instances {sorted(left)}"))
        removed += [f"instance {i}" for i in sorted(ids)]
    groups = set(known.group_ids) | {
        g["GroupId"]
        for g in ec2.describe_security_groups(Filters=[_tag_filter(cluster_id)])["SecurityGroups"]
    }
    for group_id in sorted(groups):
        if _delete_group(ec2, cluster_id, group_id, deadline, poll):
            removed.append(f"security group {group_id}")
    tagged = {
        k["KeyName"] for k in ec2.describe_key_pairs(Filters=[_tag_filter(cluster_id)])["KeyPairs"]
    }
    for key_name in sorted(tagged | set(known.key_names)):
        ec2.delete_key_pair(KeyName=key_name)  # idempotent: a missing key is no error
        if key_name in tagged:
            removed.append(f"key pair {key_name}")
    return removed


def _leftover_message(cluster_id: str, what: str) -> str:
    return (
        f"AWS resources of cluster {cluster_id} are still there ({what}): remove them with "
        f"`python -m skyward aws cleanup --cluster {cluster_id}`"
    )


def _terminate(ec2: Any, ids: list[str]) -> None:
    try:
        ec2.terminate_instances(InstanceIds=ids)
    except Exception as exc:
        if _error_code(exc) != "InvalidInstanceID.NotFound":
            raise
        # Some id is not visible yet (or gone): terminate those that exist one by one.
        for instance_id in ids:
            try:
                ec2.terminate_instances(InstanceIds=[instance_id])
            except Exception as one:
                if _error_code(one) != "InvalidInstanceID.NotFound":
                    raise


def _wait_terminated(ec2: Any, ids: list[str], deadline: float, poll: float) -> set[str]:
    left = set(ids)
    while left:
        states = {
            i["InstanceId"]: i["State"]["Name"]
            for i in _describe_instances(ec2, InstanceIds=sorted(left))
        }
        left = {i for i in left if states.get(i, "terminated") != "terminated"}
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return left


def _delete_group(ec2: Any, cluster_id: str, group_id: str, deadline: float, poll: float) -> bool:
    while True:
        try:
            ec2.delete_security_group(GroupId=group_id)
            return True
        except Exception as exc:
            code = _error_code(exc)
            if code == "InvalidGroup.NotFound":
                return False
            # Network interfaces of terminated instances take a while to be released.
            if code != "DependencyViolation" or time.monotonic() >= deadline:
                raise AWSCleanupError(
                    _leftover_message(cluster_id, f"security group {group_id}: {exc}")
                ) from exc
            time.sleep(poll)


def _run_shielded(work: Callable[[], None], timeout: float, what: str) -> None:
    """Run ``work`` in a thread until it ends (bounded), ignoring further Ctrl-C / SIGTERM.

    A second Ctrl-C while instances are being terminated must not leave them running.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            errors.append(exc)

    def interrupted() -> None:
        _say(f"still {what}; please wait (interrupting now would leave them running)")

    thread = threading.Thread(target=run, name="skyward-aws-teardown", daemon=True)
    try:
        thread.start()  # an interrupt while start() waits for the thread leaves it running
    except (KeyboardInterrupt, SystemExit):
        interrupted()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        try:
            thread.join(min(1.0, max(0.0, deadline - time.monotonic())))
        except (KeyboardInterrupt, SystemExit):
            interrupted()
    if thread.is_alive():
        raise AWSCleanupError(f"{what} did not finish within {timeout:.0f}s")
    if errors:
        raise errors[0]


# --- the provider -----------------------------------------------------------------------------


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
            terminates) after this long without a connected client.
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
        host_key: advanced/tests: path of the private host key to hand to the instances
            (and pin) instead of a fresh per-cluster key.
        public_ip_lookup: advanced/tests: returns this client's CIDR when ``ssh_cidr`` is
            not given (default :func:`checkip`).
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
        host_key: str | os.PathLike[str] | None = None,
        public_ip_lookup: Callable[[], str] = checkip,
    ) -> None:
        _boto3()
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
            ("start_timeout", start_timeout),
            ("teardown_timeout", teardown_timeout),
            ("poll_interval", poll_interval),
        ]:
            if not value > 0:
                raise ValueError(f"sky.AWS({name}={value!r}) must be > 0")
        self.region = region
        self.instance_type = instance_type
        self.ami = ami
        self.spot = spot
        self.subnet_id = subnet_id
        self.ssh_cidr = ssh_cidr
        self.user = user
        self.arch: Architecture = arch
        self.idle_shutdown_minutes = idle_shutdown_minutes
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
        self.host_key = KeyPair.load(host_key) if host_key is not None else None
        self.public_ip_lookup = public_ip_lookup

    def __repr__(self) -> str:
        return (
            f"AWS(region={self.region!r}, instance_type={self.instance_type!r}, "
            f"ami={self.ami!r}, spot={self.spot!r})"
        )

    def _clients(self) -> tuple[Any, Any]:
        session, region = _session(self.session, self.region)
        if session.get_credentials() is None:
            raise RuntimeError(
                "no AWS credentials found: run `aws configure` (or `aws sso login`), or set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        return (
            _client(session, "ec2", region, self.endpoint_url),
            _client(session, "ssm", region, self.endpoint_url),
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
        cleanup.callback(self._teardown, ec2, cluster_id, created)
        deadline = time.monotonic() + self.start_timeout
        if self.instance_type is not None:
            instance_type = self.instance_type
            arch = instance_architecture(ec2, instance_type)
        else:
            arch = self.arch
            instance_type = pick_instance_type(ec2, spec.vcpus, spec.memory, arch, self.spot)
        ami = self.ami or resolve_ami(ssm, self.ami_parameter.format(arch=arch))
        cidr = self.ssh_cidr or self.public_ip_lookup()
        login = self.ssh_key or KeyPair.generate()
        host_key = self.host_key or KeyPair.generate()
        _say(
            f"cluster {cluster_id}: starting {spec.nodes} x {instance_type}"
            f"{' (spot)' if self.spot else ''} from {ami}, SSH from {cidr}",
            self.progress,
        )

        name = f"skyward-{cluster_id}"
        created.key_names.append(name)
        ec2.import_key_pair(
            KeyName=name, PublicKeyMaterial=login.public.encode(),
            TagSpecifications=_tags("key-pair", cluster_id),
        )  # fmt: skip
        group_args: dict[str, Any] = {}
        if self.subnet_id is not None:
            subnet = ec2.describe_subnets(SubnetIds=[self.subnet_id])["Subnets"][0]
            group_args["VpcId"] = subnet["VpcId"]
        group_id = ec2.create_security_group(
            GroupName=name,
            Description=f"Skyward cluster {cluster_id}: SSH from the client only",
            TagSpecifications=_tags("security-group", cluster_id),
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
            "UserData": render_user_data(host_key, spec.image.python, self.idle_shutdown_minutes),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {
                "HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1,
            },
            "TagSpecifications": _tags("instance", cluster_id) + _tags("volume", cluster_id),
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
            code = _error_code(exc)
            if not code:
                raise
            raise RuntimeError(
                f"EC2 did not start {spec.nodes} x {instance_type} from {ami}: {exc}"
                f"{_RUN_HINTS.get(code, '')}; the cluster is being removed"
            ) from exc
        created.instance_ids.extend(i["InstanceId"] for i in reply["Instances"])

        instances = self._wait_running(ec2, created.instance_ids, deadline)
        launchers: list[Launcher] = []
        for instance in instances:
            address = self.resolve_address(instance)
            host_options: dict[str, Any] = {
                "username": self.user,
                "image": spec.image,
                "pkey": login.pkey,
                "host_keys": pinned_host_keys(address, host_key.pkey),
                "python": self.python,
            }
            if self.env_root is not None:
                host_options["env_root"] = self.env_root
            launcher = _EC2Launcher(
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

    def _wait_running(self, ec2: Any, ids: list[str], deadline: float) -> list[dict[str, Any]]:
        started = time.monotonic()
        shown: dict[str, int] | None = None
        while True:
            found = {i["InstanceId"]: i for i in _describe_instances(ec2, InstanceIds=ids)}
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
                _say(
                    f"waiting for {len(ids)} instance(s): {summary} "
                    f"({time.monotonic() - started:.0f}s)",
                    self.progress,
                )
                shown = counts
            if all(s == "running" for s in states.values()):
                return sorted((found[i] for i in ids), key=lambda i: i.get("AmiLaunchIndex", 0))
            if time.monotonic() >= deadline:
                pending = sorted(i for i, s in states.items() if s != "running")
                raise TimeoutError(
                    f"EC2 instances still not running after {self.start_timeout:.0f}s "
                    f"({', '.join(f'{i}: {states[i]}' for i in pending)}); the cluster is "
                    "being removed. Raise sky.AWS(start_timeout=...) or check the EC2 console"
                )
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def _teardown(self, ec2: Any, cluster_id: str, created: ClusterResources) -> None:
        what = f"removing the AWS resources of cluster {cluster_id}"

        def work() -> None:
            removed = destroy_cluster(
                ec2, cluster_id, known=created, timeout=self.teardown_timeout,
                poll=self.poll_interval, progress=self.progress,
            )  # fmt: skip
            if removed:
                _say(f"cluster {cluster_id}: removed {len(removed)} AWS resource(s)", self.progress)

        try:
            _run_shielded(work, self.teardown_timeout + 30, what)
        except AWSCleanupError:
            raise
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise AWSCleanupError(_leftover_message(cluster_id, detail)) from exc


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
    """Wait for one instance's SSH port, then open it like any SSH host.

    While the instance's user data is still installing Python, the interpreter wrapper
    answers :data:`SETUP_PENDING`; the launcher retries until the start deadline.
    """

    def __init__(
        self,
        name: str,
        address: Address,
        deadline: float,
        poll: float,
        progress: bool,
        host_options: dict[str, Any],
    ) -> None:
        self.name = name
        self.address = address
        self.deadline = deadline
        self.poll = poll
        self.progress = progress
        self.host_options = host_options
        self._host: HostLauncher | None = None
        self._opened = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def open(self) -> Channel:
        from skyward.node import NodeStartError
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
        host, port = self.address
        while True:
            launcher = HostLauncher(self.name, host, port, **self.host_options)
            with self._lock:
                if self._closed.is_set():
                    raise RuntimeError(f"{self.name}: the cluster is shutting down")
                self._host = launcher
            try:
                return launcher.open()
            except NodeStartError as exc:
                if SETUP_PENDING not in str(exc) or time.monotonic() >= deadline:
                    raise
            _say(f"{self.name}: instance still installing Python; retrying", self.progress)
            self._closed.wait(min(self.poll, max(0.0, deadline - time.monotonic())))

    def _wait_for_ssh(self, deadline: float) -> None:
        host, port = self.address
        while not self._closed.is_set():
            remaining = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.1, min(5, remaining))):
                    return
            except OSError as exc:
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: SSH on {host}:{port} not reachable before the start "
                        f"deadline ({exc}); check that sky.AWS(ssh_cidr=...) includes this "
                        "client's public address and that the subnet gives public IPs"
                    ) from exc
            self._closed.wait(min(self.poll, max(0.0, deadline - time.monotonic())))
        raise RuntimeError(f"{self.name}: the cluster is shutting down")

    def close(self) -> None:
        """Close the SSH connection (idempotent)."""
        with self._lock:
            self._closed.set()
            host = self._host
        if host is not None:
            host.close()


# --- cleanup command --------------------------------------------------------------------------


def _tagged_clusters(ec2: Any) -> dict[str, list[str]]:
    """Cluster id -> descriptions of its live resources, for every Skyward-tagged resource."""
    found: dict[str, list[str]] = {}

    def note(resources: Iterable[Mapping[str, Any]], kind: str, key: str) -> None:
        for resource in resources:
            cluster = _tag_value(resource)
            if cluster is not None:
                found.setdefault(cluster, []).append(f"{kind} {resource[key]}")

    note(_live_instances(ec2, None), "instance", "InstanceId")
    groups = ec2.describe_security_groups(Filters=[_tag_filter(None)])["SecurityGroups"]
    note(groups, "security group", "GroupId")
    note(ec2.describe_key_pairs(Filters=[_tag_filter(None)])["KeyPairs"], "key pair", "KeyName")
    return found


def cleanup(
    region: str | None = None,
    cluster: str | None = None,
    *,
    session: Any = None,
    endpoint_url: str | None = None,
    timeout: float = 300.0,
    poll: float = 2.0,
) -> list[str]:
    """Remove what Skyward left in ``region``: one cluster's resources, or every tagged one.

    Without ``cluster`` this also removes clusters another client is still using.
    Returns the removed resources.
    """
    session, region = _session(session, region)
    ec2 = _client(session, "ec2", region, endpoint_url)
    clusters = [cluster] if cluster is not None else sorted(_tagged_clusters(ec2))
    removed: list[str] = []
    for cluster_id in clusters:
        removed += destroy_cluster(ec2, cluster_id, timeout=timeout, poll=poll)
    return removed


def cli(args: argparse.Namespace) -> int:
    """``python -m skyward aws cleanup [--cluster ID] [--region R]``."""
    try:
        removed = cleanup(region=args.region, cluster=args.cluster)
    except Exception as exc:  # noqa: BLE001 - a command line reports, it does not trace
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    scope = f"cluster {args.cluster}" if args.cluster else "all Skyward clusters"
    if not removed:
        print(f"nothing to remove ({scope})")
    for item in removed:
        print(f"removed {item}")
    return 0
