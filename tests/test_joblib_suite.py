"""joblib's own ``joblib/test/test_parallel.py``, run in place with Skyward as the default backend.

The run happens in a child pytest (``--pyargs``) loaded with the plugin
``tests/joblib_suite/skyward_default.py``, which starts a Local cluster and makes
``"skyward"`` joblib's default backend. Every stock parametrization runs, the
loky, multiprocessing and threading ones included (forked pools inside a running
cluster); the plugin lists the few tests it skips because they assert which class
joblib's stock default backend is, with the reason for each.

The whole module takes as long as stock joblib's own run of it: about 4.5 minutes
on an idle 2-core machine, twice that under heavy load, hence the budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parent / "joblib_suite"
BUDGET_S = 1200

pytestmark = pytest.mark.timeout(BUDGET_S + 20)


def test_joblib_test_parallel_passes_with_skyward_as_default_backend(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUITE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "joblib.test.test_parallel",
        "-c",
        str(SUITE / "pytest.ini"),
        "--rootdir",
        str(tmp_path),
        "-p",
        "skyward_default",
        "-rfEsxX",
        "--timeout",
        "180",  # a hang guard per test: some spawn loky or multiprocessing pools
    ]
    try:
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=BUDGET_S
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-4000:]
        pytest.fail(f"joblib's test_parallel.py took over {BUDGET_S}s:\n{tail!r}")
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert "joblib default backend: skyward" in done.stdout
    # The closing line, not the whole output: a Compute's repr in the header reads "0 failed".
    closing = done.stdout.strip().splitlines()[-1]
    assert " passed" in closing and " failed" not in closing, report
