"""Choosing what to run and what it costs: the instance catalogue, its prices, the
architecture, the AMI, and the cost estimate of a cluster."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from skyward.errors import CostLimitError
from skyward.providers.aws.ec2 import error_code

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_AMI_PARAMETER",
    "PRICES_AS_OF",
    "PRICES_SOURCE",
    "PRICE_PER_VCPU_HOUR",
    "Architecture",
    "CostEstimate",
    "RunCost",
    "estimate_cost",
    "hourly_price",
    "instance_architecture",
    "pick_instance_type",
    "resolve_ami",
]

DEFAULT_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"

Architecture = Literal["x86_64", "arm64"]
ARCHITECTURES: tuple[Architecture, ...] = ("x86_64", "arm64")  # in order of preference

PRICES_SOURCE = "https://aws.amazon.com/ec2/pricing/on-demand/ (us-east-1, Linux, on-demand)"
PRICES_AS_OF = "2026-12-01"
"""When :data:`PRICE_PER_VCPU_HOUR` was taken from :data:`PRICES_SOURCE`."""

# Approximate prices in USD per vCPU-hour (the ".large" size's hourly price / 2; within
# these families the price scales with the vCPU count). They rank instance types (other
# regions keep roughly the same order) and give the cost estimate (see CostEstimate).
# Refresh with PRICES_AS_OF when families change.
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
        if "InvalidInstanceType" in error_code(exc):
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
        if error_code(exc) == "ParameterNotFound":
            raise ValueError(
                f"SSM parameter {parameter!r} does not exist in this region: pass "
                "sky.AWS(ami='ami-...') or another ami_parameter=..."
            ) from exc
        raise


def hourly_price(instance_type: str, vcpus: int) -> float | None:
    """Approximate on-demand USD per hour of one ``instance_type`` with ``vcpus`` vCPUs,
    from :data:`PRICE_PER_VCPU_HOUR`; ``None`` for a family the table does not price."""
    per_vcpu = PRICE_PER_VCPU_HOUR.get(instance_type.split(".")[0])
    return None if per_vcpu is None else per_vcpu * vcpus


def _usd(amount: float) -> str:
    return f"${amount:.4f}" if amount < 0.01 else f"${amount:.2f}"


@dataclass(frozen=True)
class CostEstimate:
    """The estimated hourly cost of a cluster of ``nodes`` x ``instance_type``.

    Prices are :data:`PRICE_PER_VCPU_HOUR` (us-east-1, Linux, on-demand, as of
    :data:`PRICES_AS_OF`), so other regions may cost more. For spot instances the
    on-demand price is an upper bound: it is the default maximum price of a spot request.
    """

    instance_type: str
    nodes: int
    vcpus: int
    per_instance: float | None
    spot: bool = False

    @property
    def hourly(self) -> float | None:
        """USD per hour of the whole cluster, or ``None`` when the type is not priced."""
        return None if self.per_instance is None else self.per_instance * self.nodes

    def __str__(self) -> str:
        what = f"{self.nodes} x {self.instance_type}{' (spot)' if self.spot else ''}"
        if self.per_instance is None or self.hourly is None:
            return (
                f"estimated cost unknown for {what}: the {self.instance_type.split('.')[0]} "
                "family has no price in skyward's table"
            )
        bound = "at most " if self.spot else ""
        return (
            f"estimated cost {bound}{_usd(self.hourly)}/h for {what} at "
            f"{_usd(self.per_instance)}/h each ({PRICES_SOURCE}, {PRICES_AS_OF})"
        )

    def enforce(self, limit: float | None) -> None:
        """Raise :class:`~skyward.errors.CostLimitError` if the estimate is above ``limit``
        USD per hour (or unknown while a limit is set)."""
        if limit is None:
            return
        if self.hourly is None:
            raise CostLimitError(
                f"sky.AWS(max_hourly_cost={limit:g}): no price is known for "
                f"{self.instance_type}, so the cluster cannot be held to the limit; nothing "
                "was created. Choose an instance_type of a priced family (see "
                "skyward.providers.aws.PRICE_PER_VCPU_HOUR) or pass max_hourly_cost=None"
            )
        if self.hourly > limit:
            raise CostLimitError(
                f"the estimated cost of {self.nodes} x {self.instance_type}, "
                f"{_usd(self.hourly)}/h, is above sky.AWS(max_hourly_cost={limit:g}) "
                f"({_usd(limit)}/h); nothing was created. Use fewer or smaller nodes, or "
                "raise max_hourly_cost"
            )


def estimate_cost(ec2: Any, instance_type: str, nodes: int, spot: bool = False) -> CostEstimate:
    """The :class:`CostEstimate` of ``nodes`` x ``instance_type`` (its vCPUs from EC2)."""
    vcpus = int(_instance_type_info(ec2, instance_type)["VCpuInfo"]["DefaultVCpus"])
    return CostEstimate(instance_type, nodes, vcpus, hourly_price(instance_type, vcpus), spot)


@dataclass
class RunCost:
    """What a running cluster's instances have used, replacements included.

    Each instance counts from its launch to its termination (or now); EC2 bills per
    second, at least 60 s per instance, so a replacement adds at least a minute.
    """

    estimate: CostEstimate
    # Instance id -> (launched, terminated or None), as time.monotonic() values.
    spans: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    replacements: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def launched(self, ids: list[str], replacement: bool = False) -> None:
        """Count ``ids`` from now (``replacement``: instances started for lost nodes)."""
        now = time.monotonic()
        with self._lock:
            for instance_id in ids:
                self.spans.setdefault(instance_id, (now, None))
            if replacement:
                self.replacements += len(ids)

    def terminated(self, instance_id: str) -> None:
        """Stop counting ``instance_id`` (terminated before the cluster's end)."""
        with self._lock:
            start, end = self.spans.get(instance_id, (None, None))
            if start is not None and end is None:
                self.spans[instance_id] = (start, time.monotonic())

    def instance_hours(self, now: float | None = None) -> float:
        """Hours summed over the instances, each at least 60 s."""
        now = time.monotonic() if now is None else now
        with self._lock:
            spans = list(self.spans.values())
        return sum(max(60.0, (now if end is None else end) - start) for start, end in spans) / 3600

    def __str__(self) -> str:
        hours = self.instance_hours()
        cost = (
            f"estimated cost {'at most ' if self.estimate.spot else ''}"
            f"{_usd(hours * self.estimate.per_instance)}"
            if self.estimate.per_instance is not None
            else f"cost unknown (no price for {self.estimate.instance_type})"
        )
        extra = f" ({self.replacements} replacement(s) included)" if self.replacements else ""
        return f"{hours:.3g} instance-hour(s) of {self.estimate.instance_type}{extra}, {cost}"
