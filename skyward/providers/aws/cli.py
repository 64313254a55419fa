"""``python -m skyward aws cleanup``: remove what a killed client left behind."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from skyward.providers.aws import ec2 as api
from skyward.providers.aws.teardown import destroy_cluster

if TYPE_CHECKING:
    import argparse

__all__ = ["cleanup", "cli"]


def _tagged_clusters(ec2: Any) -> dict[str, list[str]]:
    """Cluster id -> descriptions of its live resources, for every Skyward-tagged resource."""
    found: dict[str, list[str]] = {}

    def note(resources: Iterable[Mapping[str, Any]], kind: str, key: str) -> None:
        for resource in resources:
            cluster = api.tag_value(resource)
            if cluster is not None:
                found.setdefault(cluster, []).append(f"{kind} {resource[key]}")

    every = [api.tag_filter(None)]
    note(api.live_instances(ec2, None), "instance", "InstanceId")
    note(ec2.describe_security_groups(Filters=every)["SecurityGroups"], "security group", "GroupId")
    note(ec2.describe_key_pairs(Filters=every)["KeyPairs"], "key pair", "KeyName")
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
    session, region = api.session_and_region(session, region)
    ec2 = api.client(session, "ec2", region, endpoint_url)
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
