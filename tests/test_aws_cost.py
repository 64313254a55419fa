"""The AWS cost guard on a moto server: the estimate is logged before anything is created,
``max_hourly_cost`` refuses a cluster above it and creates nothing, and a running cluster
reports its instance-hours and cost (the exit summary line itself is tested end to end
in ``test_aws_e2e.py``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest

import skyward as sky
from skyward.errors import CostLimitError
from skyward.providers import ClusterSpec
from skyward.providers.aws.catalog import PRICE_PER_VCPU_HOUR, PRICES_AS_OF, estimate_cost
from skyward.spec import Image, Worker

if TYPE_CHECKING:
    from moto_ec2 import Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)

_counter = iter(range(1_000_000))
C6A_LARGE = PRICE_PER_VCPU_HOUR["c6a"] * 2  # USD per hour of one c6a.large (2 vCPUs)


def everything(moto: Moto) -> dict[str, list[str]]:
    """Every instance, key pair and security group on the server, of any cluster."""
    pages = moto.ec2.get_paginator("describe_instances").paginate()
    return {
        "instances": sorted(
            i["InstanceId"] for page in pages for r in page["Reservations"] for i in r["Instances"]
        ),
        "key pairs": sorted(k["KeyName"] for k in moto.ec2.describe_key_pairs()["KeyPairs"]),
        "groups": sorted(
            g["GroupId"] for g in moto.ec2.describe_security_groups()["SecurityGroups"]
        ),
    }


def test_max_hourly_cost_below_the_estimate_refuses_and_creates_nothing(
    moto: Moto, aws_provider: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="skyward.aws")
    before = everything(moto)
    provider = aws_provider(max_hourly_cost=0.10)
    with pytest.raises(CostLimitError) as info:
        with sky.Compute(provider=provider, nodes=2):
            pytest.fail("a cluster above max_hourly_cost must not start")
    message = str(info.value)
    assert f"${2 * C6A_LARGE:.2f}/h" in message and "max_hourly_cost=0.1" in message
    assert "2 x c6a.large" in message and "nothing was created" in message
    assert everything(moto) == before
    logged = [r.getMessage() for r in caplog.records if r.name == "skyward.aws"]
    assert any(
        f"estimated cost ${2 * C6A_LARGE:.2f}/h for 2 x c6a.large" in m and PRICES_AS_OF in m
        for m in logged
    ), logged


def test_a_type_without_a_price_is_refused_under_a_limit(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    before = everything(moto)
    provider = aws_provider(instance_type="t3.micro", max_hourly_cost=100.0)
    with pytest.raises(CostLimitError, match="no price is known for t3.micro"):
        with sky.Compute(provider=provider, nodes=1):
            pytest.fail("an unpriced type must not start under a cost limit")
    assert everything(moto) == before


def test_a_cluster_under_the_limit_starts_and_reports_its_usage(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    provider = aws_provider(max_hourly_cost=1.0)
    spec = ClusterSpec(3, Worker(), Image(), f"c{os.getpid():x}{next(_counter):04d}")
    assert provider.summary(spec.cluster_id) is None
    with ExitStack() as stack:
        provider.launch(spec, stack)
        assert len(moto.live_instances(spec.cluster_id)) == 3
        summary = provider.summary(spec.cluster_id)
        # Under a minute counts as the 60 s EC2 minimum: 3 x 60 s = 0.05 instance-hours.
        assert summary == (
            f"0.05 instance-hour(s) of c6a.large, estimated cost ${0.05 * C6A_LARGE:.4f}"
        )
    assert provider.summary(spec.cluster_id) is None
    assert moto.leftovers(spec.cluster_id) == []


def test_spot_estimate_is_an_upper_bound(moto: Moto) -> None:
    estimate = estimate_cost(moto.ec2, "m7i.2xlarge", 4, spot=True)
    assert estimate.vcpus == 8
    assert estimate.hourly == pytest.approx(4 * 8 * PRICE_PER_VCPU_HOUR["m7i"])
    assert str(estimate).startswith(f"estimated cost at most ${estimate.hourly:.2f}/h")
    with pytest.raises(ValueError, match=r"max_hourly_cost=0\) must be > 0"):
        sky.AWS(region="us-east-1", max_hourly_cost=0)
