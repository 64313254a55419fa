"""Render ``docs/benchmarks.md`` from one results file of ``python -m benchmarks``.

The page is always generated, never edited by hand:
``python -m benchmarks --docs`` runs the benchmarks and then renders it, and
``python -m benchmarks.report [RESULTS.json]`` renders it again from a saved
run (the newest file in ``benchmarks/results/`` by default).

Scaling rows are those whose workload starts with ``"scale"``; their slot
count is read from ``row.extra["slots"]``, else from ``"<N> slots"`` in the
workload name. With matplotlib installed (the bench session has it) the scaling
curve, efficiency and client CPU per task against slots, is drawn into
``docs/benchmarks-scaling.png`` and shown on the page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import Row, markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
PLOT_NAME = "benchmarks-scaling.png"

PACKAGES = (
    "skyward",
    "skyward-joblib",
    "skyward-sklearn",
    "cloudpickle",
    "lz4",
    "joblib",
    "loky",
    "numpy",
    "scikit-learn",
    "dask",
    "distributed",
    "ray",
    "paramiko",
)

# DESIGN.md section 9: what the benchmarks are measured against.
GOALS = (
    "Sleep efficiency: 2000 × 0.25 s tasks on 4 nodes × 25 slots reach ≥ 99 % of the ideal time.",
    "Tiny-task throughput (`Parallel` of no-ops on 4 Local nodes): at least loky's on the same "
    "machine, and at least 10× dask's joblib backend.",
    "GridSearchCV with a large `X`: each node receives about the size of `X` once; wall time "
    "≤ 1.1 × loky on the same cores.",
    "Start-up: `Compute(nodes=4)` on Local ready in ≤ 1 s; SSH with a cached environment ≤ 2 s.",
    '`return_as="generator"` over 10⁶ tasks keeps client memory flat.',
)


def environment() -> dict[str, Any]:
    """What the run was measured on: date, machine, OS, Python and package versions."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * size / 1024**3, 1)


def load(path: Path) -> tuple[dict[str, Any], list[Row]]:
    """Read a results file: its ``meta`` and its rows."""
    data = json.loads(path.read_text())
    return data.get("meta", {}), [Row(**row) for row in data.get("rows", [])]


def latest() -> Path:
    """The newest results file in ``benchmarks/results/``."""
    files = sorted(RESULTS.glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"no results in {RESULTS}: run `python -m benchmarks --quick` (or `nox -s bench`) first"
        )
    return files[-1]


def _slots(row: Row) -> int | None:
    if "slots" in row.extra:
        return int(row.extra["slots"])
    match = re.search(r"(\d[\d,_]*)\s*slots", row.workload)
    return int(re.sub(r"[,_]", "", match.group(1))) if match else None


def _value(row: Row) -> str:
    return f"{row.value:.4g} {row.unit}".strip()


def _met(row: Row) -> str:
    return "" if row.met is None else ("yes" if row.met else "**no**")


def ratio_table(rows: list[Row]) -> str:
    """Skyward against the peer measured in the same run, one line per comparison."""
    lines = [
        "| workload | Skyward | peer | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.ratio is None:
            continue
        lines.append(
            f"| {r.workload} | {r.system}: {_value(r)} | {r.peer or ''} | {r.ratio:.3g}× | "
            f"{r.goal or ''} | {_met(r)} |"
        )
    return "\n".join(lines)


def scaling_table(rows: list[Row]) -> str:
    """Rows of the ``scale*`` workloads, ordered by slot count."""
    scale = sorted(
        (r for r in rows if r.workload.startswith("scale")),
        key=lambda r: (_slots(r) or 0, r.workload, r.metric),
    )
    lines = [
        "| slots | workload | system | metric | value | goal | met | details |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in scale:
        slots = _slots(r)
        details = ", ".join(f"{k}: {v}" for k, v in r.extra.items() if k != "slots")
        lines.append(
            f"| {slots if slots is not None else ''} | {r.workload} | {r.system} | {r.metric} | "
            f"{_value(r)} | {r.goal or ''} | {_met(r)} | {details} |"
        )
    return "\n".join(lines)


def plot_scaling(rows: list[Row], path: Path) -> bool:
    """Draw efficiency and client CPU per task against slots into ``path`` (a PNG);
    False (nothing drawn) without matplotlib or without scaling rows."""
    points: dict[str, list[tuple[int, float, float | None]]] = {}
    for r in rows:
        slots = _slots(r)
        if r.workload.startswith("scale") and r.metric == "efficiency" and slots:
            cpu = r.extra.get("client_cpu_us_per_task")
            points.setdefault(r.system, []).append((slots, r.value, cpu))
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (eff, cpu) = plt.subplots(1, 2, figsize=(10, 3.8))
    for system, values in sorted(points.items()):
        values.sort()
        slots = [v[0] for v in values]
        style = "o-" if len(values) > 1 else "s"
        eff.plot(slots, [v[1] for v in values], style, label=system)
        cpu.plot(slots, [v[2] or 0.0 for v in values], style, label=system)
    goals = ((2000, 98), (5000, 97))
    eff.plot([g[0] for g in goals], [g[1] for g in goals], "k_", markersize=18, label="goal")
    ticks = sorted({v[0] for values in points.values() for v in values} | {g[0] for g in goals})
    eff.set(xlabel="slots (nodes × 20)", ylabel="efficiency (% of ideal)", xscale="log")
    eff.set_title("sleep tasks: ideal time / wall time")
    cpu.set(xlabel="slots (nodes × 20)", ylabel="client CPU per task (µs)", xscale="log")
    cpu.set_title("client CPU per task")
    cpu.set_ylim(bottom=0)
    for axes in (eff, cpu):
        axes.set_xticks(ticks, [str(t) for t in ticks], rotation=45, fontsize="small")
        axes.minorticks_off()
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(meta: dict[str, Any], rows: list[Row], source: str, plot: str | None = None) -> str:
    """The whole page as markdown; ``plot``: the scaling curve's image, next to the page."""
    packages = meta.get("packages") or {}
    versions = ", ".join(f"{name} {version}" for name, version in packages.items())
    memory = f", {meta['memory_gib']} GiB RAM" if meta.get("memory_gib") else ""
    kind = "a `--quick` run (small sizes)" if meta.get("quick") else "a full run"
    ran = meta.get("benchmarks")
    if ran:
        kind += f" of {', '.join(ran)}"
    goals = "\n".join(f"- {goal}" for goal in GOALS)
    has_goals = any(r.goal for r in rows)
    parts = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/report.py from " + source + ". Do not edit by hand. -->",
        "",
        "Every benchmark runs Skyward and its peers on the same work, on the same machine, in "
        "the same process run, and reports Skyward's figure divided by the peer's. A ratio "
        "above 1 means Skyward was faster (or, for efficiency, closer to ideal).",
        "",
        f"- **Run**: {kind} on {meta.get('date_utc') or meta.get('date', 'unknown date')}",
        f"- **Machine**: {meta.get('cpu', meta.get('machine', 'unknown'))}, "
        f"{meta.get('cores', '?')} cores{memory}, {meta.get('os', platform.system())}",
        f"- **Python**: {meta.get('python', '?')}",
        f"- **Packages**: {versions or 'not recorded'}",
        "",
        "## Reproduce",
        "",
        "```bash",
        "nox -s bench                     # full run: writes benchmarks/results/<date>.json",
        "nox -s bench -- --quick          # the same benchmarks at small sizes",
        "nox -s bench -- --quick --docs   # ... and regenerate this page from the run",
        "```",
        "",
        "`python -m benchmarks.report [RESULTS.json]` renders this page again from a saved run.",
        "",
        "## Goals",
        "",
        "The targets the design sets (DESIGN.md, section 9); the table says for each measured "
        "row whether it was met."
        if has_goals
        else "The targets the design sets (DESIGN.md, section 9). The rows of this run carry no "
        "goal of their own: they are reported as ratios only.",
        "",
        goals,
        "",
        "## Ratios",
        "",
        ratio_table(rows) if any(r.ratio is not None for r in rows) else "No ratios in this run.",
        "",
    ]
    if any(r.workload.startswith("scale") for r in rows):
        parts += [
            "## Scaling",
            "",
            "Efficiency is the ideal time divided by the measured wall time, as the cluster "
            "grows (tasks of 0.5 s, ten per slot, start-up measured apart); the targets are "
            "≥ 98 % at 2,000 slots (100 Local nodes × 20), ≥ 97 % at 5,000 (250 nodes) and "
            "≥ 97 % for 32 SSH nodes over loopback. Client CPU per task is the client "
            "process's CPU time over the tasks; `load_before` is the machine's load average "
            "when the point started (the machine may be shared).",
            "",
            *(
                [f"![Scaling: efficiency and client CPU per task against slots]({plot})", ""]
                if plot
                else []
            ),
            scaling_table(rows),
            "",
        ]
    parts += ["## All measurements", "", markdown(rows), ""]
    return "\n".join(parts)


def write(results: Path, page: Path = DOCS_PAGE) -> Path:
    """Render ``results`` into ``page``; return the page's path."""
    meta, rows = load(results)
    try:
        source = str(results.resolve().relative_to(ROOT))
    except ValueError:
        source = results.name
    plot = page.parent / PLOT_NAME
    drawn = plot_scaling(rows, plot)
    page.write_text(render(meta, rows, source, PLOT_NAME if drawn else None))
    return page


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report [RESULTS.json] [--out PAGE]``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, help="default: newest in results/")
    parser.add_argument("--out", type=Path, default=DOCS_PAGE, help="page to write")
    args = parser.parse_args(argv)
    try:
        results = args.results or latest()
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"wrote {write(results, args.out)} from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
