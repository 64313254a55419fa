"""scikit-learn's own test suites, run in place on loky and on Skyward, compared test by test.

``nox -s sklearn_suite`` runs this. Each backend gets a child pytest over the
installed ``sklearn.model_selection``, ``sklearn.ensemble`` and ``sklearn.callback``
test packages with the plugin ``default_backend.py``: every ``joblib.Parallel``
defaults to that backend with ``n_jobs=-1``, so every search, cross-validation and
forest really runs in parallel (on Skyward: on a Local cluster). The exit status is
1 when a test passes on loky and not on Skyward; counts, durations and every such
test (with its failure message) are printed.

Options: ``--backends skyward`` runs one side only and compares it with the other
side's results of an earlier run in ``--out``;
``--packages`` replaces the test packages; arguments after ``--`` go to each
pytest run (e.g. ``-- -k test_search``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("sklearn.model_selection", "sklearn.ensemble", "sklearn.callback")
BACKENDS = ("loky", "skyward")
REFERENCE, CANDIDATE = BACKENDS
TEST_TIMEOUT_S = 900
RUN_BUDGET_S = 4 * 3600


def run(backend: str, out: Path, packages: list[str], extra: list[str]) -> float:
    """Run the suites on ``backend``; junit XML and log go to ``out``. Return the wall time."""
    env = dict(os.environ, SKYWARD_SUITE_BACKEND=backend)
    # Rooted where scikit-learn is installed, test ids name their package (sklearn.ensemble...).
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations, "scikit-learn is not installed"
    root = Path(spec.submodule_search_locations[0]).parent
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [
        *(sys.executable, "-m", "pytest", "--pyargs", *packages),
        *("-c", str(HERE / "pytest.ini"), "--rootdir", str(root), "-p", "default_backend"),
        *("-q", "-rfE", "--timeout", str(TEST_TIMEOUT_S), f"--junitxml={out / f'{backend}.xml'}"),
        *extra,
    ]
    print(f"--- {backend}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    with open(out / f"{backend}.log", "w") as log:
        subprocess.run(
            command, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_BUDGET_S
        )
    elapsed = time.monotonic() - started
    (out / f"{backend}.seconds").write_text(f"{elapsed:.1f}\n")
    return elapsed


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, message)}`` from a junit XML report."""
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(xml).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                lines = (child.get("message") or "").splitlines()
                outcome, message = child.tag, lines[0] if lines else ""
                break
        results[test] = (outcome, message)
    return results


def summary(name: str, results: dict[str, tuple[str, str]], seconds: str) -> str:
    counts: dict[str, int] = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    return f"{name:8} {len(results):5} tests in {seconds:>7}s: {parts}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in args:
        args, extra = args[: args.index("--")], args[args.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".sklearn-suite"))
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--packages", default=",".join(PACKAGES))
    options = parser.parse_args(args)
    out: Path = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for backend in options.backends.split(","):
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        run(backend, out, options.packages.split(","), extra)

    missing = [b for b in BACKENDS if not (out / f"{b}.xml").exists()]
    if missing:
        print(f"no results for {', '.join(missing)} in {out}: run them (--backends)")
        return 2
    results = {b: outcomes(out / f"{b}.xml") for b in BACKENDS}
    for backend in BACKENDS:
        seconds = (out / f"{backend}.seconds").read_text().strip()
        print(summary(backend, results[backend], seconds))
    reference, candidate = results[REFERENCE], results[CANDIDATE]
    passed = {t for t, (outcome, _) in reference.items() if outcome == "passed"}
    regressions = sorted(t for t in passed if candidate.get(t, ("missing", ""))[0] != "passed")
    gains = sorted(
        t for t, (o, _) in candidate.items() if o == "passed" and reference.get(t, ("",))[0] != o
    )
    for test in gains:
        print(f"passes on {CANDIDATE} only: {test} ({reference.get(test, ('missing',))[0]})")
    for test in regressions:
        outcome, message = candidate.get(test, ("missing", ""))
        print(f"REGRESSION {test}: {outcome} on {CANDIDATE}: {message}")
    print(
        f"{len(passed)} tests pass on {REFERENCE}; {len(passed) - len(regressions)} of them pass "
        f"on {CANDIDATE}; {len(regressions)} do not; {len(gains)} pass on {CANDIDATE} only"
    )
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
