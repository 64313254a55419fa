"""``python -m benchmarks [--quick] [--docs] [NAME ...]``: run, print ratios, write JSON."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import traceback
from pathlib import Path

from benchmarks import report
from benchmarks.common import Row, markdown

ALL = ["throughput", "startup", "scale", "joblib_backend", "sklearn_grid", "ssh", "memory"]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a 5-minute run")
    parser.add_argument("--docs", action="store_true", help="render docs/benchmarks.md after")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: {' '.join(ALL)})")
    args = parser.parse_args()
    rows: list[Row] = []
    failed = []
    for name in args.names or ALL:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"## {name}", flush=True)
        try:
            got = module.run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        print(markdown(got), flush=True)
        rows.extend(got)
    print("\n# Summary\n")
    print(markdown(rows))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "date": stamp,
        "quick": args.quick,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "benchmarks": args.names or ALL,
    }
    meta.update(report.environment())
    path = out / f"{stamp}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2))
    print(f"\nwrote {path}")
    if args.docs:
        print(f"wrote {report.write(path)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
