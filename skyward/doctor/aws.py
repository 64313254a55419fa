"""``doctor aws``: can this client start the planned cluster? Credentials, region,
instance type, image, the account's vCPU quota for the type, the client's public
address (what port 22 will be opened to) and the cluster's estimated cost.

Nothing is created. The quota comes from the Service Quotas API; where it does not
answer (no permission, a test server), the check says it could not be made.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any

from skyward.doctor import Check, fail, ok, skip
from skyward.errors import CostLimitError
from skyward.providers.aws import ec2 as api
from skyward.providers.aws.catalog import (
    estimate_cost,
    instance_architecture,
    pick_instance_type,
    resolve_ami,
)

if TYPE_CHECKING:
    from skyward.providers.aws import AWS

__all__ = ["QUOTA_CODES", "check_aws"]

SUBJECT = "aws"

# Service Quotas codes of the EC2 vCPU limits: (on-demand, spot) per family class.
QUOTA_CODES: dict[str, tuple[str, str]] = {
    "standard (A, C, D, H, I, M, R, T, Z)": ("L-1216C47A", "L-34B43A08"),
    "G and VT": ("L-DB2E81BA", "L-3819A6DF"),
    "P": ("L-417A185B", "L-7212CCBC"),
}
_CLASS_OF_LETTERS = {
    **{letter: "standard (A, C, D, H, I, M, R, T, Z)" for letter in "acdhimrtz"},
    "g": "G and VT", "vt": "G and VT", "p": "P",
}  # fmt: skip
_CREDENTIAL_CODES = {"InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken"}


def check_aws(provider: AWS, *, nodes: int = 1, vcpus: int | None = None) -> list[Check]:
    """Check what ``provider`` needs to start ``nodes`` nodes; stop at a blocking failure."""
    try:
        session, region = api.session_and_region(provider.session, provider.region)
    except ValueError as exc:
        return [fail(SUBJECT, "region", str(exc), "pass --region (sky.AWS(region=...))")]
    checks = [_credentials(session, region, provider.endpoint_url)]
    if checks[-1].status == "FAIL":
        return checks
    ec2 = api.client(session, "ec2", region, provider.endpoint_url)
    checks.append(_region(ec2, region))
    if checks[-1].status == "FAIL":
        return checks
    try:
        if provider.instance_type is not None:
            instance_type = provider.instance_type
            arch = instance_architecture(ec2, instance_type)
        else:
            arch = provider.arch
            instance_type = pick_instance_type(ec2, vcpus, None, arch, provider.spot)
        cost = estimate_cost(ec2, instance_type, nodes, provider.spot)
    except ValueError as exc:
        return [*checks, fail(SUBJECT, "instance type", str(exc), "pass another --instance-type")]
    checks.append(ok(SUBJECT, "instance type", f"{instance_type}: {arch}, {cost.vcpus} vCPU(s)"))
    ssm = api.client(session, "ssm", region, provider.endpoint_url)
    checks.append(_image(ssm, provider, arch))
    quotas = api.client(session, "service-quotas", region, provider.endpoint_url)
    checks.append(_quota(quotas, instance_type, nodes * cost.vcpus, provider.spot))
    checks.append(_public_address(provider))
    try:
        cost.enforce(provider.max_hourly_cost)
        checks.append(ok(SUBJECT, "cost", str(cost)))
    except CostLimitError as exc:
        checks.append(fail(SUBJECT, "cost", str(exc), "plan fewer or smaller nodes"))
    return checks


def _credentials(session: Any, region: str, endpoint_url: str | None) -> Check:
    if session.get_credentials() is None:
        return fail(
            SUBJECT, "credentials", "no AWS credentials found",
            "run `aws configure` (or `aws sso login`), or set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        )  # fmt: skip
    try:
        identity = api.client(session, "sts", region, endpoint_url).get_caller_identity()
    except Exception as exc:  # noqa: BLE001 - reported with its fix
        code = api.error_code(exc)
        if code in _CREDENTIAL_CODES:
            return fail(
                SUBJECT, "credentials", f"AWS refused the credentials ({code}: {exc})",
                "refresh them (`aws sso login`, or new access keys in `aws configure`)",
            )  # fmt: skip
        return fail(
            SUBJECT, "credentials", f"cannot check them: {type(exc).__name__}: {exc}",
            "check the network and the region, then retry",
        )  # fmt: skip
    return ok(SUBJECT, "credentials", f"account {identity['Account']} as {identity['Arn']}")


def _region(ec2: Any, region: str) -> Check:
    try:
        zones = ec2.describe_availability_zones()["AvailabilityZones"]
    except Exception as exc:  # noqa: BLE001 - reported with its fix
        return fail(
            SUBJECT, "region", f"EC2 in {region} does not answer: {type(exc).__name__}: {exc}",
            "pass an existing, enabled region with --region (e.g. us-east-1); opt-in regions "
            "must be enabled in the account first",
        )  # fmt: skip
    return ok(SUBJECT, "region", f"{region}: {len(zones)} availability zone(s)")


def _image(ssm: Any, provider: AWS, arch: str) -> Check:
    if provider.ami is not None:
        return ok(SUBJECT, "image", f"{provider.ami} (given)")
    parameter = provider.ami_parameter.format(arch=arch)
    try:
        return ok(SUBJECT, "image", f"{resolve_ami(ssm, parameter)} (from {parameter})")
    except ValueError as exc:
        return fail(SUBJECT, "image", str(exc), "pass sky.AWS(ami='ami-...')")
    except Exception as exc:  # noqa: BLE001 - e.g. no ssm:GetParameter permission
        return fail(
            SUBJECT, "image", f"cannot read {parameter}: {type(exc).__name__}: {exc}",
            "allow ssm:GetParameter on the public parameters (see the AWS docs page) or pass "
            "sky.AWS(ami='ami-...')",
        )  # fmt: skip


def _quota(quotas: Any, instance_type: str, needed: int, spot: bool) -> Check:
    letters = re.match(r"[a-z]+", instance_type.lower())
    family_class = _CLASS_OF_LETTERS.get(letters.group(0) if letters else "")
    if family_class is None:
        return skip(SUBJECT, "quota", f"no vCPU quota code known for {instance_type}")
    code = QUOTA_CODES[family_class][1 if spot else 0]
    market = "spot" if spot else "on-demand"
    try:
        quota = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
    except Exception as exc:  # noqa: BLE001 - absent API or permission: not a failure
        return skip(
            SUBJECT, "quota", f"Service Quotas did not answer for {code} "
            f"({type(exc).__name__}: {exc}); see it in the Service Quotas console",
        )  # fmt: skip
    limit = float(quota["Value"])
    what = f"{market} {family_class} vCPU quota {limit:g} ({code})"
    if needed > limit:
        return fail(
            SUBJECT, "quota", f"the cluster needs {needed} vCPUs, above the {what}",
            f"request an increase of {code} in the Service Quotas console, or plan fewer or "
            "smaller nodes",
        )  # fmt: skip
    return ok(SUBJECT, "quota", f"{needed} vCPUs needed of the {what} (running instances count)")


def _public_address(provider: AWS) -> Check:
    if provider.ssh_cidr is not None:
        network = ipaddress.ip_network(provider.ssh_cidr, strict=False)
        return ok(SUBJECT, "public address", f"{network} (given): port 22 will be open to it only")
    try:
        cidr = provider.public_ip_lookup()
    except Exception as exc:  # noqa: BLE001 - reported with its fix
        return fail(
            SUBJECT, "public address", f"{type(exc).__name__}: {exc}",
            "pass --ssh-cidr (sky.AWS(ssh_cidr='203.0.113.7/32')) with your public address",
        )  # fmt: skip
    return ok(SUBJECT, "public address", f"{cidr} (looked up): port 22 will be open to it only")
