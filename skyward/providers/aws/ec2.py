"""Talking to EC2: boto3 (imported only when used), sessions and clients, error codes,
the cluster tag and the lookups by it, and progress lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("skyward.aws")

TAG = "skyward:cluster"
"""Tag key on every resource Skyward creates; the value is the cluster id."""

INSTALL_HINT = "pip install 'skyward[aws]'"
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


def boto3_module() -> Any:
    """The ``boto3`` module, or an ImportError naming the extra to install."""
    try:
        import boto3
    except ImportError as exc:
        raise ImportError(f"sky.AWS needs boto3, which is not installed: {INSTALL_HINT}") from exc
    return boto3


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ``ClientError`` (``""`` for other exceptions)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def client(session: Any, service: str, region: str, endpoint_url: str | None) -> Any:
    """A boto3 client with bounded connect/read timeouts and standard retries."""
    from botocore.config import Config

    config = Config(
        connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 5}
    )
    return session.client(service, region_name=region, endpoint_url=endpoint_url, config=config)


def session_and_region(session: Any, region: str | None) -> tuple[Any, str]:
    """``session`` (default: a new one from the environment) and the region to use."""
    boto3 = boto3_module()
    session = session if session is not None else boto3.Session(region_name=region)
    region = region or session.region_name
    if not region:
        raise ValueError(
            "no AWS region configured: pass sky.AWS(region='us-east-1'), set "
            "AWS_DEFAULT_REGION, or run `aws configure`"
        )
    return session, region


def say(message: str, progress: bool = True) -> None:
    """Log ``message``; with ``progress`` also print it on stderr."""
    log.info("%s", message)
    if progress:
        try:
            sys.stderr.write(f"skyward: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def tags(resource_type: str, cluster_id: str) -> list[dict[str, Any]]:
    """``TagSpecifications`` marking a new resource as the cluster's."""
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    values = [
        {"Key": TAG, "Value": cluster_id},
        {"Key": "skyward:created", "Value": created},
        {"Key": "Name", "Value": f"skyward-{cluster_id}"},
    ]
    return [{"ResourceType": resource_type, "Tags": values}]


def tag_filter(cluster_id: str | None) -> dict[str, Any]:
    """Filter for one cluster's resources, or (``None``) for every Skyward resource."""
    if cluster_id is None:
        return {"Name": "tag-key", "Values": [TAG]}
    return {"Name": f"tag:{TAG}", "Values": [cluster_id]}


def tag_value(resource: Mapping[str, Any]) -> str | None:
    """The cluster id a resource is tagged with."""
    for tag in resource.get("Tags", []):
        if tag.get("Key") == TAG:
            return str(tag.get("Value"))
    return None


def describe_instances(ec2: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Every instance ``describe_instances(**kwargs)`` finds (no error for unknown ids)."""
    try:
        pages = ec2.get_paginator("describe_instances").paginate(**kwargs)
        return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    except Exception as exc:
        if error_code(exc) == "InvalidInstanceID.NotFound":
            return []
        raise


def live_instances(ec2: Any, cluster_id: str | None) -> list[dict[str, Any]]:
    """Instances of the cluster (or of every cluster) that are not terminated."""
    filters = [tag_filter(cluster_id), {"Name": "instance-state-name", "Values": LIVE_STATES}]
    return describe_instances(ec2, Filters=filters)
