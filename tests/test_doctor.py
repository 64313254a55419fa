"""``python -m skyward doctor``: SSH checks on the loopback sshd hosts (one healthy, one
with an unknown host key, one down), AWS checks on the moto server. Every problem is
printed on one line with its fix and the exit status is 1; healthy targets print ok lines
and exit 0. Nothing here reads the real ~/.ssh/config or reaches the internet."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sshd_hosts import SSHDCluster

from skyward.__main__ import main
from skyward.doctor import report
from skyward.doctor.aws import _quota, check_aws

if TYPE_CHECKING:
    from moto_ec2 import Moto

pytest_plugins = ["moto_ec2"]
pytestmark = pytest.mark.timeout(120)


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def ssh_args(cluster: SSHDCluster, known_hosts: str, env_root: str, *extra: str) -> list[str]:
    return [
        "--key", cluster.key_filename, "--known-hosts", known_hosts, "--ssh-config", "none",
        "--python", sys.executable, "--env-root", env_root, "--timeout", "10", *extra,
    ]  # fmt: skip


def lines_of(text: str, subject: str) -> list[str]:
    return [line for line in text.splitlines() if f" {subject}: " in line]


# --- ssh -------------------------------------------------------------------------------------


def test_doctor_ssh_prints_a_down_host_and_an_unknown_host_key_with_fixes(
    ssh_clean: SSHDCluster, ssh_env_root: str, tmp_path: Path
) -> None:
    good, stranger = ssh_clean.hosts[0], ssh_clean.hosts[1]
    known = tmp_path / "known_hosts"
    known.write_text(good.known_hosts_line)  # the second host's key is not trusted
    down = f"{ssh_clean.hosts[2].address}:{free_port(ssh_clean.hosts[2].address)}"
    hosts = [f"{good.address}:{good.port}", f"{stranger.address}:{stranger.port}", down]
    result = subprocess.run(
        [sys.executable, "-m", "skyward", "doctor", "ssh", *hosts,
         *ssh_args(ssh_clean, str(known), ssh_env_root, "--min-free-gb", "0.001")],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    healthy = lines_of(out, hosts[0])
    assert [line.split(":")[2].strip() for line in healthy] == [
        "reachable", "host key", "login", "python", "installer", "disk",
    ], out  # fmt: skip
    assert all(line.startswith("ok ") for line in healthy), out
    assert good.host_key().fingerprint in healthy[1]
    (unknown,) = lines_of(out, hosts[1])[1:]  # after "reachable"
    assert unknown.startswith(f"FAIL {hosts[1]}: host key: ")
    assert stranger.host_key().fingerprint in unknown and "-> fix: " in unknown
    (refused,) = lines_of(out, down)
    assert refused.startswith(f"FAIL {down}: reachable: cannot connect to {down}")
    assert "-> fix: check the address and port" in refused
    assert out.splitlines()[-1] == "2 problem(s) found"


def test_doctor_ssh_healthy_hosts_print_ok_lines_and_exit_zero(
    ssh_clean: SSHDCluster, ssh_env_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ssh_args(ssh_clean, ssh_clean.known_hosts, ssh_env_root, "--min-free-gb", "0.001")
    assert main(["doctor", "ssh", *ssh_clean.specs(), *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 * 6 + 1 and out[-1] == "no problem found"
    assert all(line.startswith("ok ") for line in out[:-1]), out


def test_doctor_ssh_missing_python_and_full_disk_are_problems_with_fixes(
    ssh_clean: SSHDCluster, ssh_env_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = ssh_clean.specs()[:1]
    args = ssh_args(ssh_clean, ssh_clean.known_hosts, ssh_env_root)
    assert main(["doctor", "ssh", *spec, *args, "--python", "/nonexistent/python3"]) == 1
    (python,) = [line for line in capsys.readouterr().out.splitlines() if ": python: " in line]
    assert python.startswith("FAIL ") and "--python /path/to/python3." in python
    assert main(["doctor", "ssh", *spec, *args, "--min-free-gb", "1e9"]) == 1
    (disk,) = [line for line in capsys.readouterr().out.splitlines() if ": disk: " in line]
    assert disk.startswith("FAIL ") and "1e+09 GiB wanted -> fix: " in disk


# --- aws -------------------------------------------------------------------------------------


def aws_args(moto: Moto, *extra: str) -> list[str]:
    return [
        "doctor", "aws", "--region", moto.region, "--endpoint-url", moto.endpoint,
        "--ssh-cidr", moto.client_cidr, *extra,
    ]  # fmt: skip


def test_doctor_aws_healthy_on_moto_says_which_checks_it_could_not_make(
    moto: Moto, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(aws_args(moto, "--instance-type", "c6a.large", "--nodes", "2")) == 0
    out = capsys.readouterr().out.splitlines()
    checks = {line.split(":")[1].strip(): line for line in out[:-1]}
    assert list(checks) == [
        "credentials", "region", "instance type", "image", "quota", "public address", "cost",
    ], out  # fmt: skip
    assert checks["credentials"].startswith("ok   aws: credentials: account 123456789012")
    # moto has no EC2 quotas in Service Quotas: reported, not failed.
    assert checks["quota"].startswith("skip aws: quota: could not check: ")
    assert "L-1216C47A" in checks["quota"]
    assert checks["public address"].startswith(f"ok   aws: public address: {moto.client_cidr}")
    assert "estimated cost $0.15/h for 2 x c6a.large" in checks["cost"]
    assert out[-1] == "no problem found, 1 check(s) not made"


def test_doctor_aws_problems_on_moto_print_their_fix_and_exit_one(
    moto: Moto, capsys: pytest.CaptureFixture[str]
) -> None:
    expensive = ["--instance-type", "c6a.large", "--nodes", "40", "--max-hourly-cost", "1"]
    assert main(aws_args(moto, *expensive)) == 1
    (cost,) = [line for line in capsys.readouterr().out.splitlines() if ": cost: " in line]
    assert cost.startswith("FAIL aws: cost: the estimated cost of 40 x c6a.large")
    assert "-> fix: plan fewer or smaller nodes" in cost
    assert main(aws_args(moto, "--instance-type", "c6a.nonexistent")) == 1
    out = capsys.readouterr().out
    assert "FAIL aws: instance type: sky.AWS(instance_type='c6a.nonexistent')" in out
    assert "-> fix: pass another --instance-type" in out


def test_doctor_aws_without_credentials_names_the_fix(moto: Moto, tmp_path: Path) -> None:
    env = {k: v for k, v in moto.env().items() if not k.startswith("AWS_")}
    env.update(
        HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "skyward", *aws_args(moto, "--instance-type", "c6a.large")],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "FAIL aws: credentials: no AWS credentials found -> fix: run `aws configure` (or "
        "`aws sso login`), or set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
        "1 problem(s) found",
    ]


def test_doctor_aws_public_address_comes_from_the_provider_resolver(
    moto: Moto, aws_provider: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline() -> str:
        raise RuntimeError("could not find this client's public IP address (offline)")

    checks = check_aws(aws_provider(ssh_cidr=None, public_ip_lookup=offline))
    assert report(checks) == 1
    (line,) = [c.line for c in checks if c.name == "public address"]
    assert line.startswith("FAIL aws: public address: RuntimeError: could not find")
    assert "-> fix: pass --ssh-cidr" in line
    looked_up = check_aws(aws_provider(ssh_cidr=None, public_ip_lookup=lambda: "192.0.2.9/32"))
    assert [c.status for c in looked_up if c.name == "public address"] == ["ok"]
    capsys.readouterr()


class _Quotas:
    """Service Quotas' GetServiceQuota reply (moto has no EC2 quotas to answer with)."""

    def __init__(self, value: float) -> None:
        self.value = value
        self.asked: list[str] = []

    def get_service_quota(self, ServiceCode: str, QuotaCode: str) -> dict[str, Any]:  # noqa: N803
        self.asked.append(QuotaCode)
        return {"Quota": {"QuotaCode": QuotaCode, "Value": self.value}}


def test_quota_below_the_cluster_need_is_a_problem() -> None:
    quotas = _Quotas(32.0)
    low = _quota(quotas, "c6a.16xlarge", 64, spot=False)
    assert low.status == "FAIL" and "needs 64 vCPUs" in low.detail and "L-1216C47A" in low.fix
    assert _quota(quotas, "g5.xlarge", 8, spot=True).status == "ok"
    assert quotas.asked == ["L-1216C47A", "L-3819A6DF"]
    assert _quota(quotas, "inf2.xlarge", 4, spot=False).status == "skip"
