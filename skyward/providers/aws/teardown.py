"""Removing a cluster: terminate its instances, wait for them, delete its security groups
and key pairs; found by tag and by the ids the client recorded, and shielded from a
second Ctrl-C."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skyward.errors import AWSCleanupError
from skyward.providers.aws import ec2 as api
from skyward.waits import call_with_timeout, retries

__all__ = ["ClusterResources", "destroy_cluster", "remove_cluster"]


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
    ids = {i["InstanceId"] for i in api.live_instances(ec2, cluster_id)}
    if known.instance_ids:
        seen = {
            i["InstanceId"]: i["State"]["Name"]
            for i in api.describe_instances(ec2, InstanceIds=known.instance_ids)
        }
        # An id not visible yet (eventual consistency) may still be starting: include it.
        ids |= {i for i in known.instance_ids if seen.get(i) != "terminated"}
    if ids:
        api.say(f"terminating {len(ids)} instance(s) of cluster {cluster_id}", progress)
        _terminate(ec2, sorted(ids))
        left = _wait_terminated(ec2, sorted(ids), deadline, poll)
        if left:
            raise AWSCleanupError(leftover_message(cluster_id, f"instances {sorted(left)}"))
        removed += [f"instance {i}" for i in sorted(ids)]
    by_tag = [api.tag_filter(cluster_id)]
    groups = set(known.group_ids) | {
        g["GroupId"] for g in ec2.describe_security_groups(Filters=by_tag)["SecurityGroups"]
    }
    for group_id in sorted(groups):
        if _delete_group(ec2, cluster_id, group_id, deadline, poll):
            removed.append(f"security group {group_id}")
    tagged = {k["KeyName"] for k in ec2.describe_key_pairs(Filters=by_tag)["KeyPairs"]}
    for key_name in sorted(tagged | set(known.key_names)):
        ec2.delete_key_pair(KeyName=key_name)  # idempotent: a missing key is no error
        if key_name in tagged:
            removed.append(f"key pair {key_name}")
    return removed


def leftover_message(cluster_id: str, what: str) -> str:
    """What is left of a cluster, and the command that removes it."""
    return (
        f"AWS resources of cluster {cluster_id} are still there ({what}): remove them with "
        f"`python -m skyward aws cleanup --cluster {cluster_id}`"
    )


def _terminate(ec2: Any, ids: list[str]) -> None:
    try:
        ec2.terminate_instances(InstanceIds=ids)
    except Exception as exc:
        if api.error_code(exc) != "InvalidInstanceID.NotFound":
            raise
        # Some id is not visible yet (or gone): terminate those that exist one by one.
        for instance_id in ids:
            try:
                ec2.terminate_instances(InstanceIds=[instance_id])
            except Exception as one:
                if api.error_code(one) != "InvalidInstanceID.NotFound":
                    raise


def _wait_terminated(ec2: Any, ids: list[str], deadline: float, poll: float) -> set[str]:
    left = set(ids)
    for _ in retries(deadline, poll):
        states = {
            i["InstanceId"]: i["State"]["Name"]
            for i in api.describe_instances(ec2, InstanceIds=sorted(left))
        }
        left = {i for i in left if states.get(i, "terminated") != "terminated"}
        if not left:
            break
    return left


def _delete_group(ec2: Any, cluster_id: str, group_id: str, deadline: float, poll: float) -> bool:
    error: Exception | None = None
    for _ in retries(deadline, poll):
        try:
            ec2.delete_security_group(GroupId=group_id)
            return True
        except Exception as exc:
            code = api.error_code(exc)
            if code == "InvalidGroup.NotFound":
                return False
            error = exc
            # Network interfaces of terminated instances take a while to be released.
            if code != "DependencyViolation":
                break
    raise AWSCleanupError(
        leftover_message(cluster_id, f"security group {group_id}: {error}")
    ) from error


def run_shielded(work: Callable[[], None], timeout: float, what: str) -> None:
    """Run ``work`` in a thread until it ends (bounded), ignoring further Ctrl-C / SIGTERM.

    A second Ctrl-C while instances are being terminated must not leave them running.
    """

    def interrupted() -> None:
        api.say(f"still {what}; please wait (interrupting now would leave them running)")

    finished, error = call_with_timeout(
        work, timeout, name="skyward-aws-teardown", on_interrupt=interrupted
    )
    if not finished:
        raise AWSCleanupError(f"{what} did not finish within {timeout:.0f}s")
    if error is not None:
        raise error


def remove_cluster(
    ec2: Any,
    cluster_id: str,
    created: ClusterResources,
    *,
    timeout: float,
    poll: float,
    progress: bool,
) -> None:
    """The provider's teardown: :func:`destroy_cluster`, shielded; any failure is an
    :class:`AWSCleanupError` that names the cleanup command."""

    def work() -> None:
        removed = destroy_cluster(
            ec2, cluster_id, known=created, timeout=timeout, poll=poll, progress=progress
        )
        if removed:
            api.say(f"cluster {cluster_id}: removed {len(removed)} AWS resource(s)", progress)

    try:
        run_shielded(work, timeout + 30, f"removing the AWS resources of cluster {cluster_id}")
    except AWSCleanupError:
        raise
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise AWSCleanupError(leftover_message(cluster_id, detail)) from exc
