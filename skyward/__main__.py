"""Command line: ``python -m skyward plugins | doctor ssh|aws | aws cleanup``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from skyward.doctor import add_parser as add_doctor


def _plugins(_: argparse.Namespace) -> int:
    from skyward.plugins import installed

    rows = [(p.name, p.distribution, p.version) for p in installed()]
    if not rows:
        print("no Skyward plugins installed (try: pip install 'skyward[joblib]')")
        return 0
    width = [max(len(r[i]) for r in [("name", "distribution", "version"), *rows]) for i in range(3)]
    for row in [("name", "distribution", "version"), *rows]:
        print("  ".join(col.ljust(width[i]) for i, col in enumerate(row)).rstrip())
    return 0


def _aws(args: argparse.Namespace) -> int:
    from skyward.providers.aws.cli import cli

    return cli(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m skyward``."""
    parser = argparse.ArgumentParser(prog="python -m skyward", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plugins", help="list installed plugins").set_defaults(run=_plugins)
    add_doctor(commands)
    aws_parser = commands.add_parser("aws", help="AWS helpers")
    aws_commands = aws_parser.add_subparsers(dest="aws_command", required=True)
    cleanup = aws_commands.add_parser("cleanup", help="remove resources Skyward left behind")
    cleanup.add_argument("--cluster", help="only this cluster id")
    cleanup.add_argument("--region", help="AWS region (default: your configured region)")
    cleanup.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    cleanup.add_argument(
        "--yes", "-y", action="store_true", help="remove without asking for confirmation"
    )
    cleanup.set_defaults(run=_aws)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
