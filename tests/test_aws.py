"""AWS provider against a moto server on 127.0.0.1 (EC2 side: no node is ever opened here).

The user data and its scripts are tested in ``test_aws_userdata.py``, the end-to-end runs
with loopback sshd hosts in ``test_aws_e2e.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import wait_until

import skyward as sky
from skyward.providers import ClusterSpec
from skyward.providers.aws import ec2, teardown
from skyward.providers.aws.catalog import PRICE_PER_VCPU_HOUR, pick_instance_type
from skyward.spec import Image, Worker

if TYPE_CHECKING:
    from moto_ec2 import Consoles, Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)

_counter = iter(range(1_000_000))


def spec(nodes: int = 2, vcpus: int | None = None, memory: float | None = None) -> ClusterSpec:
    """A cluster spec with a fresh id."""
    cluster_id = f"t{os.getpid():x}{next(_counter):04d}"
    return ClusterSpec(nodes, Worker(), Image(), cluster_id, vcpus, memory)


@pytest.fixture
def launched(moto: Moto, aws_provider: Callable[..., Any]) -> Iterator[tuple[ClusterSpec, Any]]:
    """A 2-node cluster provisioned on moto (not opened); torn down at the end."""
    cluster = spec(2)
    with ExitStack() as stack:
        launchers = aws_provider().launch(cluster, stack)
        yield cluster, launchers
    assert moto.leftovers(cluster.cluster_id) == []


# --- packaging -------------------------------------------------------------------------------


def test_skyward_imports_without_boto3_and_aws_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["boto3"] = None
        sys.modules["botocore"] = None
        import skyward as sky
        assert sky.Compute and sky.Local
        try:
            sky.AWS()
        except ImportError as exc:
            print("ERROR:", exc)
        from skyward.__main__ import main
        sys.exit(main(["aws", "cleanup", "--region", "us-east-1"]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert "ERROR:" in result.stdout and "pip install 'skyward[aws]'" in result.stdout
    assert result.returncode == 1
    assert "pip install 'skyward[aws]'" in result.stderr


# --- what launch creates ---------------------------------------------------------------------


def test_launch_tags_key_pair_group_and_instances_then_teardown_removes_all(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    cluster = spec(3)
    cid = cluster.cluster_id
    with ExitStack() as stack:
        launchers = aws_provider().launch(cluster, stack)
        instances = moto.live_instances(cid)
        assert len(launchers) == len(instances) == 3
        assert [launcher.name for launcher in launchers] == sorted(
            (i["InstanceId"] for i in instances),
            key=lambda iid: next(i["AmiLaunchIndex"] for i in instances if i["InstanceId"] == iid),
        )
        assert {i["State"]["Name"] for i in instances} == {"running"}
        (key_pair,) = moto.key_pairs(cid)
        (group,) = moto.groups(cid)
        assert all(i["KeyName"] == key_pair["KeyName"] for i in instances)
        assert all(
            [g["GroupId"] for g in i["SecurityGroups"]] == [group["GroupId"]] for i in instances
        )
        for instance in instances:
            behaviour = moto.ec2.describe_instance_attribute(
                InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
            )["InstanceInitiatedShutdownBehavior"]["Value"]
            assert behaviour == "terminate"
            assert instance["MetadataOptions"]["HttpTokens"] == "required"
    assert moto.leftovers(cid) == []
    assert {i["State"]["Name"] for i in moto.all_instances(cid)} == {"terminated"}


def test_run_instances_carries_a_client_token(
    moto: Moto, launched: tuple[ClusterSpec, Any]
) -> None:
    """A retried request (its reply lost) returns the first one's instances, not a second
    set: EC2 deduplicates by ClientToken."""
    cluster, _ = launched
    tokens = {i["ClientToken"] for i in moto.live_instances(cluster.cluster_id)}
    (token,) = tokens
    assert token.startswith(f"skyward-{cluster.cluster_id}-") and len(token) <= 64


def test_a_key_pair_name_taken_by_someone_else_is_not_deleted(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    """The import fails (the name exists): the teardown must not remove that key pair."""
    from skyward.providers.aws.keys import KeyPair

    cluster = spec(1)
    theirs = f"skyward-{cluster.cluster_id}"
    moto.ec2.import_key_pair(KeyName=theirs, PublicKeyMaterial=KeyPair.generate().public.encode())
    try:
        with pytest.raises(Exception, match="Duplicate"):
            with ExitStack() as stack:
                aws_provider().launch(cluster, stack)
        names = [k["KeyName"] for k in moto.ec2.describe_key_pairs()["KeyPairs"]]
        assert theirs in names
        assert moto.leftovers(cluster.cluster_id) == []
    finally:
        moto.ec2.delete_key_pair(KeyName=theirs)


def test_host_key_comes_from_the_instance_console_and_two_keys_there_are_refused(
    moto: Moto, launched: tuple[ClusterSpec, Any], consoles: Consoles
) -> None:
    """The real GetConsoleOutput call (moto's consoles show what the test says): the key
    appears after a few polls; a console showing two keys is refused; none is a timeout."""
    import time

    from skyward.errors import HostKeyError
    from skyward.providers.aws.keys import KeyPair, console_host_key

    _, launchers = launched
    ours, theirs = launchers[0].name, launchers[1].name
    key, other = KeyPair.generate(), KeyPair.generate()
    polls = iter(range(1000))

    def show(instance: Any) -> str:
        booted = instance.id == ours and next(polls) >= 3  # printed after a while
        return f"[  9.1] boot\r\nSKYWARD-HOST-KEY {key.public}\r\n" if booted else ""

    consoles.show = show

    def read(instance_id: str, seconds: float) -> Any:
        return console_host_key(
            moto.ec2, instance_id, time.monotonic() + seconds, 0.05, threading.Event()
        )

    assert read(ours, 30).asbytes() == key.pkey.asbytes()
    assert {c["InstanceId"] for c in consoles.calls} == {ours}
    with pytest.raises(TimeoutError, match=f"{theirs}: the instance printed no SSH host key"):
        read(theirs, 0.3)
    consoles.show = lambda i: f"SKYWARD-HOST-KEY {key.public}\nSKYWARD-HOST-KEY {other.public}\n"
    with pytest.raises(HostKeyError, match="shows 2 different SSH host keys"):
        read(ours, 30)


def test_security_group_only_ingress_is_port_22_from_the_given_cidr(
    moto: Moto, launched: tuple[ClusterSpec, Any]
) -> None:
    cluster, _ = launched
    (group,) = moto.groups(cluster.cluster_id)
    assert [
        (p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
        for p in group["IpPermissions"]
    ] == [("tcp", 22, 22, [moto.client_cidr])]
    assert all(not p.get("Ipv6Ranges") for p in group["IpPermissions"])


# --- choices ---------------------------------------------------------------------------------


def _price(info: dict[str, Any]) -> float:
    return (
        PRICE_PER_VCPU_HOUR[info["InstanceType"].split(".")[0]] * info["VCpuInfo"]["DefaultVCpus"]
    )


def test_vcpus_64_picks_the_cheapest_priced_type_with_at_least_64_vcpus(moto: Moto) -> None:
    chosen = pick_instance_type(moto.ec2, vcpus=64)
    catalogue = {
        t["InstanceType"]: t
        for page in moto.ec2.get_paginator("describe_instance_types").paginate()
        for t in page["InstanceTypes"]
    }
    info = catalogue[chosen]
    assert info["VCpuInfo"]["DefaultVCpus"] >= 64
    assert "x86_64" in info["ProcessorInfo"]["SupportedArchitectures"]
    rivals = [
        t
        for name, t in catalogue.items()
        if name.split(".")[0] in PRICE_PER_VCPU_HOUR
        and t["VCpuInfo"]["DefaultVCpus"] >= 64
        and "x86_64" in t["ProcessorInfo"]["SupportedArchitectures"]
        and not t["BareMetal"]
    ]
    assert rivals and all(_price(info) <= _price(t) for t in rivals)


def test_memory_and_arch_constrain_the_choice(moto: Moto) -> None:
    chosen = pick_instance_type(moto.ec2, vcpus=2, memory=100, arch="arm64")
    (info,) = moto.ec2.describe_instance_types(InstanceTypes=[chosen])["InstanceTypes"]
    assert info["MemoryInfo"]["SizeInMiB"] >= 100 * 1024
    assert info["ProcessorInfo"]["SupportedArchitectures"] == ["arm64"]


def test_no_fitting_type_is_a_clear_error(moto: Moto) -> None:
    with pytest.raises(ValueError, match="no x86_64 EC2 instance type has 100000 vCPUs"):
        pick_instance_type(moto.ec2, vcpus=100_000)


def _ssm_ami(moto: Moto, arch: str) -> str:
    import boto3

    ssm = boto3.client("ssm", region_name=moto.region, endpoint_url=moto.endpoint)
    parameter = f"/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
    return str(ssm.get_parameter(Name=parameter)["Parameter"]["Value"])


def test_compute_vcpus_sizes_the_instances_and_ami_comes_from_ssm(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    cluster = spec(1, vcpus=64)
    with ExitStack() as stack:
        aws_provider(instance_type=None).launch(cluster, stack)
        (instance,) = moto.live_instances(cluster.cluster_id)
    (info,) = moto.ec2.describe_instance_types(InstanceTypes=[instance["InstanceType"]])[
        "InstanceTypes"
    ]
    assert info["VCpuInfo"]["DefaultVCpus"] >= 64
    assert instance["ImageId"] == _ssm_ami(moto, "x86_64")


def test_explicit_instance_type_and_ami_win(moto: Moto, aws_provider: Callable[..., Any]) -> None:
    ami = moto.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    cluster = spec(1, vcpus=64)
    with ExitStack() as stack:
        aws_provider(instance_type="t3.micro", ami=ami).launch(cluster, stack)
        (instance,) = moto.live_instances(cluster.cluster_id)
    assert (instance["InstanceType"], instance["ImageId"]) == ("t3.micro", ami)


@pytest.mark.parametrize(
    ("instance_type", "arch"), [("t2.micro", "x86_64"), ("c7g.large", "arm64")]
)
def test_image_architecture_comes_from_the_instance_type(
    moto: Moto, aws_provider: Callable[..., Any], instance_type: str, arch: str
) -> None:
    """t2 types list i386 first; the image is the x86_64 one, never an i386 lookup."""
    cluster = spec(1)
    with ExitStack() as stack:
        aws_provider(instance_type=instance_type).launch(cluster, stack)
        (instance,) = moto.live_instances(cluster.cluster_id)
    assert (instance["InstanceType"], instance["ImageId"]) == (instance_type, _ssm_ami(moto, arch))


@pytest.mark.parametrize(
    ("instance_type", "error"),
    [
        ("q9.huge", "no such EC2 instance type"),
        # Neither x86_64 nor arm64: no Amazon Linux image to look up.
        ("mac1.metal", r"mac1\.metal.*x86_64_mac.*x86_64 or arm64"),
    ],
)
def test_unusable_instance_type_fails_before_creating_anything(
    moto: Moto, aws_provider: Callable[..., Any], instance_type: str, error: str
) -> None:
    cluster = spec(1)
    with pytest.raises(ValueError, match=error):
        with ExitStack() as stack:
            aws_provider(instance_type=instance_type).launch(cluster, stack)
    assert moto.leftovers(cluster.cluster_id) == []


def test_refused_run_instances_names_the_cause_and_removes_the_rest(
    moto: Moto, aws_provider: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto import settings

    monkeypatch.setattr(settings, "ENABLE_AMI_VALIDATION", True)  # the server is in-process
    cluster = spec(2)
    with pytest.raises(RuntimeError, match=r"EC2 did not start 2 x c6a.large .*InvalidAMIID"):
        with ExitStack() as stack:
            aws_provider(ami="ami-00000000").launch(cluster, stack)
    assert moto.leftovers(cluster.cluster_id) == []


def test_missing_credentials_and_region_are_clear_errors(
    moto: Moto, aws_provider: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(RuntimeError, match="no AWS credentials found: run `aws configure`"):
        aws_provider().check(spec(1))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ValueError, match="no AWS region configured"):
        aws_provider(region=None).check(spec(1))


def test_invalid_options_are_reported_at_construction(aws_provider: Callable[..., Any]) -> None:
    with pytest.raises(ValueError, match="ssh_cidr='everyone'"):
        aws_provider(ssh_cidr="everyone")
    with pytest.raises(ValueError, match="idle_shutdown_minutes=0"):
        aws_provider(idle_shutdown_minutes=0)


# --- teardown on every path ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_start_failure_inside_compute_removes_everything_and_says_why(
    moto: Moto, aws_provider: Callable[..., Any], capfd: pytest.CaptureFixture[str]
) -> None:
    """SSH never answers (nobody listens): a clear deadline error, then a full teardown."""
    seen: list[str] = []

    def resolver(instance: dict[str, Any]) -> tuple[str, int]:
        seen.append(_tag(instance))
        return "127.0.0.1", 9

    provider = aws_provider(resolve_address=resolver, start_timeout=3, progress=True)
    with pytest.raises(Exception, match=r"SSH on 127\.0\.0\.1:9 not reachable before the start"):
        with sky.Compute(provider=provider, nodes=2):
            pytest.fail("the cluster must not start")
    (cluster_id,) = set(seen)
    assert moto.leftovers(cluster_id) == []
    err = capfd.readouterr().err
    assert "waiting for 2 instance(s)" in err and "terminating 2 instance(s)" in err


def _tag(instance: dict[str, Any]) -> str:
    return next(t["Value"] for t in instance["Tags"] if t["Key"] == "skyward:cluster")


def test_exception_after_launch_removes_everything(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    cluster = spec(2)
    with pytest.raises(ZeroDivisionError):
        with ExitStack() as stack:
            aws_provider().launch(cluster, stack)
            assert len(moto.live_instances(cluster.cluster_id)) == 2
            1 / 0  # noqa: B018
    assert moto.leftovers(cluster.cluster_id) == []


def test_teardown_finds_instances_by_tag_even_if_the_client_lost_their_ids(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    cluster = spec(2)
    stack = ExitStack()
    aws_provider().launch(cluster, stack)
    leaked = stack.pop_all()  # the client "forgets" what it created
    try:
        removed = teardown.destroy_cluster(moto.ec2, cluster.cluster_id, poll=0.1, progress=False)
        assert len([r for r in removed if r.startswith("instance ")]) == 2
        assert moto.leftovers(cluster.cluster_id) == []
    finally:
        leaked.close()


def test_teardown_survives_a_second_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the teardown runs is reported and ignored; the work completes."""
    interrupted = threading.Event()
    messages: list[str] = []

    def record(message: str, progress: bool = True) -> None:
        messages.append(message)
        interrupted.set()

    monkeypatch.setattr(ec2, "say", record)

    def work() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        # Finish only once the waiting thread has seen (and survived) the interrupt.
        assert interrupted.wait(10)

    teardown.run_shielded(work, 30, "removing test resources")
    assert messages and "still removing test resources" in messages[0]


CLIENT = """
import sys, time
import skyward as sky
from skyward.providers.aws import AWS

def resolver(instance):
    tag = next(t["Value"] for t in instance["Tags"] if t["Key"] == "skyward:cluster")
    print("CLUSTER", tag, flush=True)
    time.sleep(120)  # the signal arrives while the client is still provisioning
    return "127.0.0.1", 9

provider = AWS(region="us-east-1", endpoint_url=sys.argv[1], ssh_cidr="198.51.100.7/32",
               instance_type="c6a.large", poll_interval=0.1, progress=True,
               resolve_address=resolver)
with sky.Compute(provider=provider, nodes=2):
    print("STARTED", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.timeout(90)
def test_signal_to_client_while_provisioning_removes_everything(moto: Moto, signum: int) -> None:
    cluster_id, code, err = moto.run_client(CLIENT, [moto.endpoint], "CLUSTER", signum)
    assert code != 0
    assert "terminating 2 instance(s)" in err, err
    assert wait_until(lambda: moto.leftovers(cluster_id) == [], 10), moto.leftovers(cluster_id)


# --- the cleanup command ---------------------------------------------------------------------


def _leak(provider: Any) -> tuple[str, ExitStack]:
    cluster = spec(2)
    stack = ExitStack()
    provider.launch(cluster, stack)
    return cluster.cluster_id, stack.pop_all()


def test_cleanup_command_removes_a_leaked_cluster(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    leaked_id, leaked = _leak(aws_provider())
    kept_id, kept = _leak(aws_provider())
    try:
        result = subprocess.run(
            [sys.executable, "-m", "skyward", "aws", "cleanup", "--cluster", leaked_id,
             "--region", moto.region, "--yes"],
            capture_output=True, text=True, timeout=60, env=moto.env(),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("removed instance ") == 2
        assert "removed security group " in result.stdout
        assert f"removed key pair skyward-{leaked_id}" in result.stdout
        assert moto.leftovers(leaked_id) == []
        assert len(moto.leftovers(kept_id)) == 4  # another cluster is not touched
        everything = subprocess.run(
            [sys.executable, "-m", "skyward", "aws", "cleanup", "--region", moto.region, "-y"],
            capture_output=True, text=True, timeout=60, env=moto.env(),
        )  # fmt: skip
        assert everything.returncode == 0, everything.stderr
        assert moto.leftovers(kept_id) == []
        again = subprocess.run(
            [sys.executable, "-m", "skyward", "aws", "cleanup", "--cluster", leaked_id],
            capture_output=True, text=True, timeout=60, env=moto.env(),
        )  # fmt: skip
        assert again.returncode == 0 and "nothing to remove" in again.stdout
    finally:
        leaked.close()
        kept.close()


def cleanup_command(moto: Moto, *args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m skyward aws cleanup ARGS`` on the moto server, ``answer`` on its stdin."""
    return subprocess.run(
        [sys.executable, "-m", "skyward", "aws", "cleanup", "--region", moto.region, *args],
        input=answer, capture_output=True, text=True, timeout=60, env=moto.env(),
    )  # fmt: skip


def test_cleanup_dry_run_lists_and_removes_nothing(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    leaked_id, leaked = _leak(aws_provider())
    try:
        result = cleanup_command(moto, "--cluster", leaked_id, "--dry-run")
        assert result.returncode == 0, result.stderr
        (listing,) = [line for line in result.stdout.splitlines() if leaked_id in line]
        assert listing.count("instance i-") == 2 and f"key pair skyward-{leaked_id}" in listing
        assert "would remove 4 resource(s) of 1 cluster(s); nothing was removed" in result.stdout
        assert "removed instance" not in result.stdout and "[y/N]" not in result.stderr
        assert len(moto.leftovers(leaked_id)) == 4
    finally:
        leaked.close()


@pytest.mark.parametrize(("answer", "removes"), [("", False), ("n\n", False), ("y\n", True)])
def test_cleanup_asks_before_removing_anything(
    moto: Moto, aws_provider: Callable[..., Any], answer: str, removes: bool
) -> None:
    leaked_id, leaked = _leak(aws_provider())
    try:
        result = cleanup_command(moto, "--cluster", leaked_id, answer=answer)
        assert "remove these 4 resource(s) of 1 cluster(s)? [y/N]" in result.stderr
        assert result.returncode == (0 if removes else 1), result.stderr
        if removes:
            assert result.stdout.count("removed instance ") == 2
            assert moto.leftovers(leaked_id) == []
        else:
            assert "nothing was removed (answer y, or pass --yes)" in result.stdout
            assert len(moto.leftovers(leaked_id)) == 4
    finally:
        leaked.close()


def test_public_ip_lookup_is_used_when_no_cidr_is_given(
    moto: Moto, aws_provider: Callable[..., Any]
) -> None:
    cluster = spec(1)
    with ExitStack() as stack:
        aws_provider(ssh_cidr=None, public_ip_lookup=lambda: "192.0.2.44/32").launch(cluster, stack)
        (group,) = moto.groups(cluster.cluster_id)
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "192.0.2.44/32"


# --- the documented IAM policy -----------------------------------------------------------------


def documented_policy() -> dict[str, Any]:
    import json
    import re

    page = (Path(__file__).resolve().parent.parent / "docs" / "aws.md").read_text()
    section = page[page.index("## Permissions") :]
    match = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert match is not None, "docs/aws.md: no IAM policy under ## Permissions"
    policy: dict[str, Any] = json.loads(match.group(1))
    return policy


def test_documented_iam_policy_allows_every_call_and_scopes_the_destructive_ones(
    moto: Moto, aws_provider: Callable[..., Any], consoles: Consoles
) -> None:
    """Every EC2/SSM call of a launch, host-key read, teardown and cleanup listing is in
    the policy; tagging only while creating; removing, opening and reading only what is
    tagged skyward:cluster."""
    import time

    import boto3

    from skyward.providers.aws import leftovers
    from skyward.providers.aws.keys import KeyPair, console_host_key

    calls: set[str] = set()
    session = boto3.Session(region_name=moto.region)

    def record(model: Any, **_: Any) -> None:
        calls.add(f"{model.service_model.endpoint_prefix}:{model.name}")

    session.events.register("before-call.*.*", record)
    key = KeyPair.generate()
    consoles.show = lambda instance: f"SKYWARD-HOST-KEY {key.public}\n"
    cluster = spec(1)
    with ExitStack() as stack:
        launcher = aws_provider(session=session, instance_type=None).launch(cluster, stack)[0]
        ec2 = session.client("ec2", endpoint_url=moto.endpoint)
        console_host_key(ec2, launcher.name, time.monotonic() + 30, 0.05, threading.Event())
        leftovers(moto.region, session=session, endpoint_url=moto.endpoint)
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:GetConsoleOutput"} <= calls

    statements = documented_policy()["Statement"]
    allowed = {
        action
        for s in statements
        for action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert calls - allowed == set(), sorted(calls)

    def conditions(action: str) -> list[dict[str, Any]]:
        return [
            s.get("Condition", {})
            for s in statements
            if action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        ]

    tag = {"Null": {"ec2:ResourceTag/skyward:cluster": "false"}}
    for action in ("TerminateInstances", "DeleteSecurityGroup", "DeleteKeyPair",
                   "GetConsoleOutput"):  # fmt: skip
        assert conditions(f"ec2:{action}") == [tag], action
    (create,) = conditions("ec2:CreateTags")
    assert sorted(create["StringEquals"]["ec2:CreateAction"]) == [
        "CreateSecurityGroup", "ImportKeyPair", "RunInstances",
    ]  # fmt: skip
