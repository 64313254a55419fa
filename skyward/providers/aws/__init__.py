"""``sky.AWS()``: EC2 instances as nodes, created per cluster and removed on every exit path.

For each ``Compute`` the provider creates, all tagged ``skyward:cluster=<id>``:

- an SSH key pair generated on the client (the private key never leaves memory),
- a security group whose only ingress is TCP 22 from the client's public address,
- the instances, with ``InstanceInitiatedShutdownBehavior="terminate"``, IMDSv2 only,
  and cloud-init user data (no secret, no key) that first arms a hard lifetime
  (``max_lifetime_hours``) and a dead-man switch (power off once no client has been
  logged in for ``idle_shutdown_minutes``), then installs a pinned, checksummed uv and
  the image's Python. Each instance generates its own SSH host key and prints it on its
  console, where the client reads it (``ec2:GetConsoleOutput``) and pins it.

Each node is then reached through :class:`skyward.providers.ssh.HostLauncher`, the
same SSH channel and bootstrap as ``sky.SSH``. Teardown (terminate, wait, delete the
security group and key pair) is registered before anything is created, finds the
cluster's resources by tag, and runs to completion even through a second Ctrl-C.
``python -m skyward aws cleanup`` removes whatever a killed client left behind.

The parts: :mod:`.provider` (``AWS`` and its node launcher), :mod:`.catalog` (instance
types, prices, architecture, AMI), :mod:`.userdata` (cloud-init from the shell and
systemd files in ``templates/``), :mod:`.keys`, :mod:`.teardown`, :mod:`.cli`
(``aws cleanup``) and :mod:`.ec2` (boto3 access, tags). boto3 is imported only when
the provider is used (``skyward[aws]``).
"""

from __future__ import annotations

from skyward.errors import AWSCleanupError
from skyward.providers.aws.catalog import (
    PRICE_PER_VCPU_HOUR,
    instance_architecture,
    pick_instance_type,
    resolve_ami,
)
from skyward.providers.aws.cli import cleanup, cli, leftovers
from skyward.providers.aws.ec2 import TAG
from skyward.providers.aws.keys import KeyPair, console_host_key, console_host_keys
from skyward.providers.aws.provider import AWS, checkip, public_address
from skyward.providers.aws.teardown import ClusterResources, destroy_cluster
from skyward.providers.aws.userdata import render_user_data

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
    "console_host_key",
    "console_host_keys",
    "destroy_cluster",
    "instance_architecture",
    "leftovers",
    "pick_instance_type",
    "public_address",
    "render_user_data",
    "resolve_ami",
]
