"""``python -m skyward aws cleanup``: remove what a killed client left behind."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from skyward.providers.aws import ec2 as api
from skyward.providers.aws.teardown import destroy_cluster

if TYPE_CHECKING:
    import argparse

__all__ = ["cleanup", "cli", "leftovers"]


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


def leftovers(
    region: str | None = None,
    cluster: str | None = None,
    *,
    session: Any = None,
    endpoint_url: str | None = None,
) -> dict[str, list[str]]:
    """Skyward's resources in ``region`` (only ``cluster``'s when given): cluster id ->
    descriptions such as ``"instance i-0abc"``."""
    session, region = api.session_and_region(session, region)
    found = _tagged_clusters(api.client(session, "ec2", region, endpoint_url))
    return {c: items for c, items in found.items() if cluster is None or c == cluster}


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

    Without ``cluster`` this also removes clusters another client is still using (see
    :func:`leftovers` to list them first). Returns the removed resources.
    """
    session, region = api.session_and_region(session, region)
    ec2 = api.client(session, "ec2", region, endpoint_url)
    clusters = [cluster] if cluster is not None else sorted(_tagged_clusters(ec2))
    removed: list[str] = []
    for cluster_id in clusters:
        removed += destroy_cluster(ec2, cluster_id, timeout=timeout, poll=poll)
    return removed


def _confirm(question: str) -> bool:
    """Ask on stderr, read the answer from stdin; only "y" or "yes" agrees (end of input
    does not)."""
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cli(args: argparse.Namespace) -> int:
    """``python -m skyward aws cleanup [--cluster ID] [--region R] [--dry-run] [--yes]``.

    Lists what it finds, then removes it once confirmed (``--yes``: without asking;
    ``--dry-run``: list only). Only the listed clusters are removed.
    """
    scope = f"cluster {args.cluster}" if args.cluster else "all Skyward clusters"
    try:
        found = leftovers(region=args.region, cluster=args.cluster)
        if not found:
            print(f"nothing to remove ({scope})")
            return 0
        for cluster_id, items in sorted(found.items()):
            print(f"cluster {cluster_id}: {', '.join(items)}")
        count = f"{sum(len(items) for items in found.values())} resource(s) of {len(found)} "
        count += "cluster(s)"
        if args.dry_run:
            print(f"dry run: would remove {count}; nothing was removed")
            return 0
        if not args.yes and not _confirm(f"remove these {count}? [y/N] "):
            print("nothing was removed (answer y, or pass --yes)")
            return 1
        removed: list[str] = []
        for cluster_id in sorted(found):
            removed += cleanup(region=args.region, cluster=cluster_id)
    except Exception as exc:  # noqa: BLE001 - a command line reports, it does not trace
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for item in removed:
        print(f"removed {item}")
    return 0
