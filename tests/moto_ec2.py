"""A moto EC2/SSM server on 127.0.0.1 for the AWS provider tests.

Nothing here talks to AWS: the server runs in this process (``ThreadedMotoServer``),
credentials are dummies, the metadata service is disabled. moto hands out public IPs
that look real; tests never connect to them (every provider gets a resolver that maps
instances to loopback addresses).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
CLIENT_CIDR = "198.51.100.7/32"  # TEST-NET-2: a client address that is never contacted
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class Moto:
    """The running server and a client on it."""

    endpoint: str
    ec2: Any
    region = REGION
    client_cidr = CLIENT_CIDR

    def env(self) -> dict[str, str]:
        """Environment for a subprocess whose boto3 must talk to this server only."""
        return {**os.environ, **ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def live_instances(self, cluster_id: str) -> list[dict[str, Any]]:
        """Instances of the cluster that are not terminated."""
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:skyward:cluster", "Values": [cluster_id]}]
        )
        return [
            i
            for page in pages
            for r in page["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ]

    def all_instances(self, cluster_id: str) -> list[dict[str, Any]]:
        """Every instance ever started for the cluster, terminated ones included."""
        reply = self.ec2.describe_instances(
            Filters=[{"Name": "tag:skyward:cluster", "Values": [cluster_id]}]
        )
        return [i for r in reply["Reservations"] for i in r["Instances"]]

    def groups(self, cluster_id: str) -> list[dict[str, Any]]:
        """Security groups tagged with the cluster."""
        tag = [{"Name": "tag:skyward:cluster", "Values": [cluster_id]}]
        return list(self.ec2.describe_security_groups(Filters=tag)["SecurityGroups"])

    def key_pairs(self, cluster_id: str) -> list[dict[str, Any]]:
        """Key pairs tagged with the cluster."""
        tag = [{"Name": "tag:skyward:cluster", "Values": [cluster_id]}]
        return list(self.ec2.describe_key_pairs(Filters=tag)["KeyPairs"])

    def leftovers(self, cluster_id: str) -> list[str]:
        """Everything of the cluster still there (empty when the teardown was complete)."""
        return (
            [
                f"instance {i['InstanceId']} {i['State']['Name']}"
                for i in self.live_instances(cluster_id)
            ]
            + [f"security group {g['GroupId']}" for g in self.groups(cluster_id)]
            + [f"key pair {k['KeyName']}" for k in self.key_pairs(cluster_id)]
        )

    def run_client(
        self, script: str, args: list[str], marker: str, signum: int | None
    ) -> tuple[str, int, str]:
        """Run a client ``script`` in a subprocess on this server.

        Once it prints ``<marker> <cluster id>``, send it ``signum`` (``None``: let it end).
        Returns the cluster id, its exit code and its stderr (bounded waits).
        """
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # bounded by the calling test's timeout
            assert line.startswith(marker + " "), line + proc.stderr.read()
            cluster_id = line.split()[1]
            if signum is not None:
                assert self.live_instances(cluster_id), "the client created no instance"
                proc.send_signal(signum)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        return cluster_id, proc.returncode, err


def unreachable(instance: Mapping[str, Any]) -> tuple[str, int]:
    """Resolver for tests that never open a node: a loopback port nobody listens on."""
    return "127.0.0.1", 9


def fail_lookup() -> str:
    """Public-IP lookup for tests: calling it is a bug (tests pass ``ssh_cidr``)."""
    raise AssertionError("the test tried to look up its public IP on the internet")


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    """One moto server for the session, stopped at its end."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    saved = {key: os.environ.get(key) for key in ENV}
    os.environ.update(ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield Moto(endpoint, boto3.client("ec2", region_name=REGION, endpoint_url=endpoint))
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Consoles:
    """What the instances' consoles show on the moto server (moto itself returns one
    canned boot log for every instance). Test seam: ``show`` maps moto's instance model
    to the lines the instance would print; the client reads them with the real
    ``GetConsoleOutput`` call, over HTTP, like from EC2. ``calls`` records each call's
    parameters."""

    show: Callable[[Any], str] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def consoles(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> Consoles:
    """Per-instance console output on the (in-process) moto server, for this test."""
    from moto.core.responses import ActionResult
    from moto.core.types import Base64EncodedString
    from moto.core.utils import utcnow
    from moto.ec2.responses.general import SAMPLE_CONSOLE_OUTPUT, General

    state = Consoles()

    def get_console_output(self: Any) -> ActionResult:
        state.calls.append({k: self._get_param(k) for k in ("InstanceId", "Latest")})
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        text = SAMPLE_CONSOLE_OUTPUT + (state.show(instance) if state.show else "")
        return ActionResult(
            {
                "InstanceId": instance.id,
                "Timestamp": utcnow(),
                "Output": Base64EncodedString.from_raw_string(text),
            }
        )

    monkeypatch.setattr(General, "get_console_output", get_console_output)
    return state


@pytest.fixture
def aws_provider(moto: Moto) -> Callable[..., Any]:
    """Factory of ``sky.AWS`` on the moto server with test-safe defaults (overridable)."""
    from skyward.providers.aws import AWS

    def make(**options: Any) -> AWS:
        defaults: dict[str, Any] = {
            "region": REGION,
            "endpoint_url": moto.endpoint,
            "ssh_cidr": CLIENT_CIDR,
            "instance_type": "c6a.large",
            "poll_interval": 0.1,
            "progress": False,
            "resolve_address": unreachable,
            "public_ip_lookup": fail_lookup,
        }
        return AWS(**{**defaults, **options})

    return make
