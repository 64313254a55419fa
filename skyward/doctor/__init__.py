"""``python -m skyward doctor``: check a provider before a long run.

Each check prints one line, ``ok``, ``FAIL`` with the fix, or ``skip`` when it could
not be made (e.g. an API the account or a test server does not offer); the command
exits with status 1 when any check failed. :mod:`.ssh` checks SSH hosts (reachable,
host key known, login, Python, installer, free disk), :mod:`.aws` an AWS account and
region (credentials, region, instance type, image, vCPU quota, the client's public
address, the cluster's estimated cost).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    import argparse

__all__ = ["Check", "add_parser", "report"]

Status = Literal["ok", "FAIL", "skip"]


@dataclass(frozen=True)
class Check:
    """The result of one check: what was checked, how it went, and the fix when it failed."""

    subject: str
    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def line(self) -> str:
        """``ok   host: check: detail`` (a failure ends with ``-> fix: ...``)."""
        text = f"{self.status:<4} {self.subject}: {self.name}: {self.detail}"
        return f"{text} -> fix: {self.fix}" if self.fix else text


def ok(subject: str, name: str, detail: str) -> Check:
    """A check that passed."""
    return Check(subject, name, "ok", detail)


def fail(subject: str, name: str, detail: str, fix: str) -> Check:
    """A problem, with what fixes it."""
    return Check(subject, name, "FAIL", detail, fix)


def skip(subject: str, name: str, detail: str) -> Check:
    """A check that could not be made (not a failure)."""
    return Check(subject, name, "skip", f"could not check: {detail}")


def report(checks: list[Check], out: TextIO | None = None) -> int:
    """Print one line per check and a total; return the exit status (1 on any failure)."""
    out = out or sys.stdout
    for check in checks:
        print(check.line, file=out)
    problems = sum(check.status == "FAIL" for check in checks)
    unchecked = sum(check.status == "skip" for check in checks)
    total = f"{problems} problem(s) found" if problems else "no problem found"
    print(f"{total}{f', {unchecked} check(s) not made' if unchecked else ''}", file=out)
    return 1 if problems else 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``doctor ssh`` and ``doctor aws`` sub-commands."""
    doctor = commands.add_parser("doctor", help="check a provider before a long run")
    targets = doctor.add_subparsers(dest="doctor_command", required=True)

    ssh = targets.add_parser("ssh", help="check SSH hosts")
    ssh.add_argument("hosts", nargs="+", help="host, user@host, host:port or ssh config alias")
    ssh.add_argument("--user", help="login name (default: ssh config, else yours)")
    ssh.add_argument("--port", type=int, help="SSH port (default: ssh config, else 22)")
    ssh.add_argument(
        "--key", dest="key_filename", help="private key (default: ssh config, agent, ~/.ssh/id_*)"
    )
    ssh.add_argument("--known-hosts", help="trusted host keys (default ~/.ssh/known_hosts)")
    ssh.add_argument("--ssh-config", help="ssh client config (default ~/.ssh/config; 'none')")
    ssh.add_argument("--python", default="python3", help="interpreter on the hosts")
    ssh.add_argument("--env-root", help="environments folder on the hosts")
    ssh.add_argument("--min-free-gb", type=float, default=2.0, help="free disk wanted (GiB)")
    ssh.add_argument(
        "--timeout", dest="connect_timeout", type=float, default=10.0, help="seconds to connect"
    )
    ssh.set_defaults(run=_ssh)

    aws = targets.add_parser("aws", help="check AWS credentials, region, quota and cost")
    aws.add_argument("--region", help="AWS region (default: your configured region)")
    aws.add_argument("--instance-type", help="EC2 type (default: the one sky.AWS would pick)")
    aws.add_argument("--vcpus", type=int, help="vCPUs per node when no type is given")
    aws.add_argument("--nodes", type=int, default=1, help="nodes of the planned cluster")
    aws.add_argument("--spot", action="store_true", help="plan spot instances")
    aws.add_argument("--ssh-cidr", help="address allowed to SSH (default: looked up)")
    aws.add_argument("--max-hourly-cost", type=float, help="planned sky.AWS(max_hourly_cost)")
    aws.add_argument("--endpoint-url", help="EC2/SSM/STS endpoint override (e.g. a test server)")
    aws.set_defaults(run=_aws)


# The options handed to the provider as they are (argparse dest = parameter name).
_SSH_OPTIONS = ("user", "port", "key_filename", "known_hosts", "ssh_config", "python",
                "connect_timeout", "env_root")  # fmt: skip
_AWS_OPTIONS = ("region", "instance_type", "spot", "ssh_cidr", "endpoint_url", "max_hourly_cost")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    """The options among ``names`` given on the command line (None: the provider's default)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _ssh(args: argparse.Namespace) -> int:
    from skyward.doctor.ssh import check_ssh
    from skyward.providers.ssh import SSH

    try:
        provider = SSH(args.hosts, **_given(args, _SSH_OPTIONS))
    except (TypeError, ValueError) as exc:
        return report([fail("ssh", "arguments", str(exc), "correct the hosts or the options")])
    return report(check_ssh(provider, min_free_gb=args.min_free_gb))


def _aws(args: argparse.Namespace) -> int:
    from skyward.doctor.aws import check_aws

    try:
        from skyward.providers.aws import AWS

        provider = AWS(progress=False, **_given(args, _AWS_OPTIONS))
    except ImportError as exc:
        return report([fail("aws", "boto3", str(exc), "pip install 'skyward[aws]'")])
    except ValueError as exc:
        return report([fail("aws", "arguments", str(exc), "correct the options")])
    return report(check_aws(provider, nodes=args.nodes, vcpus=args.vcpus))
