"""The three distributions build as wheels and ``skyward[sklearn]`` installs from them.

Builds ``skyward``, ``skyward-joblib`` and ``skyward-sklearn`` with ``uv build``,
installs ``skyward[sklearn]`` into a fresh ``uv venv`` with ``--find-links`` to
those wheels (third-party dependencies come from the package index), then, in
that venv and outside the source tree, runs a ``GridSearchCV`` through the
plugin on Local agents and ``python -m skyward plugins``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import need

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTIONS = {
    "skyward": ".",
    "skyward-joblib": "skyward_joblib",
    "skyward-sklearn": "skyward_sklearn",
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    import skyward as sky
    import skyward_sklearn

    X, y = load_iris(return_X_y=True)
    with sky.Compute(nodes=2, worker=sky.Worker(concurrency=2),
                     plugins=[sky.plugins.sklearn()]) as compute:
        grid = GridSearchCV(SVC(), {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]},
                            cv=5, n_jobs=-1).fit(X, y)
        nodes = compute.stats(refresh=True)["nodes"]
    json.dump({
        "best_params": grid.best_params_,
        "agent_tasks": sum(n["tasks_done"] for n in nodes.values()),
        "skyward": sky.__file__,
        "plugin": skyward_sklearn.__file__,
        "image": list(compute.image.pip),
    }, sys.stdout)
    """
)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _expected_best_params() -> dict[str, object]:
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10], "kernel": ["linear", "rbf"]}
    return dict(GridSearchCV(SVC(), grid, cv=5).fit(X, y).best_params_)


@pytest.mark.timeout(600)
def test_skyward_sklearn_installs_from_built_wheels_and_runs(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    need(uv is not None, "uv")
    assert uv is not None
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheels = tmp_path / "wheels"
    for name, folder in DISTRIBUTIONS.items():
        _run([uv, "build", "--wheel", "--out-dir", str(wheels), str(ROOT / folder)], ROOT, env, 300)
        assert list(wheels.glob(f"{name.replace('-', '_')}-*.whl")), f"no wheel for {name}"

    venv = tmp_path / "venv"
    _run([uv, "venv", "--python", sys.executable, str(venv)], tmp_path, env, 120)
    python = venv / "bin" / "python"
    _run(
        [
            uv,
            "pip",
            "install",
            "--python",
            str(python),
            "--find-links",
            str(wheels),
            "skyward[sklearn]",
        ],
        tmp_path,
        env,
        300,
    )

    run_dir = tmp_path / "elsewhere"  # not the source tree: imports must come from the venv
    run_dir.mkdir()
    out = json.loads(_run([str(python), "-c", SCRIPT], run_dir, env, 240))
    site = str(venv)
    assert out["skyward"].startswith(site) and out["plugin"].startswith(site), out
    assert out["best_params"] == _expected_best_params(), out
    assert out["agent_tasks"] > 0, out
    assert any(r.startswith("scikit-learn==") for r in out["image"]), out

    installed_plugin = Path(out["plugin"]).with_name("plugin.py").read_text()
    assert installed_plugin == (ROOT / "skyward_sklearn/skyward_sklearn/plugin.py").read_text()

    # The AWS user-data templates are package data: they must be in the wheel.
    render = (
        "from skyward.providers.aws.userdata import render_user_data\n"
        "print(render_user_data('3.11', 15, 12, 'ec2-user'))"
    )
    user_data = _run([str(python), "-c", render], run_dir, env, 60)
    for part in ("skyward-deadman", "uv python install 3.11", "SKYWARD-HOST-KEY"):
        assert part in user_data, user_data

    listing = _run([str(python), "-m", "skyward", "plugins"], run_dir, env, 60)
    rows = {line.split()[0]: line.split()[1:] for line in listing.splitlines()[1:]}
    assert rows.get("joblib", [None])[0] == "skyward-joblib", listing
    assert rows.get("sklearn", [None])[0] == "skyward-sklearn", listing
