"""Sessions: tests, demo, lint, docs, bench. Each builds its own virtualenv (uv when available)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests"]

LOCAL = ["-e", ".", "-e", "./skyward_joblib", "-e", "./skyward_sklearn"]
EXAMPLE_PLUGIN = "./examples/plugins/skyward-hello"
TEST_DEPS = [
    "pytest>=8",
    "pytest-timeout",
    "psutil",
    "numpy",
    "pandas",
    "scikit-learn",
    "threadpoolctl",
    "boto3",
    "moto[server]>=5",
    "build",
    "uv",
]
BENCH_DEPS = [
    "numpy",
    "scikit-learn",
    "psutil",
    "loky",
    "dask[distributed]",
    "moto[server]>=5",
    "matplotlib",  # the scaling plot in docs/benchmarks.md
]


@nox.session
def tests(session: nox.Session) -> None:
    """Install the three distributions and the example plugin, run pytest."""
    session.install(*LOCAL, EXAMPLE_PLUGIN, *TEST_DEPS)
    session.run("pytest", *session.posargs)


@nox.session
def sklearn_suite(session: nox.Session) -> None:
    """scikit-learn's model_selection, ensemble and callback tests, in place, with n_jobs=-1
    on loky then on Skyward; fails on any test that passes on loky only (tests/sklearn_suite).
    """
    session.install(*LOCAL, "pytest>=8", "pytest-timeout", "pandas", "rich", "threadpoolctl")
    results = ".nox/sklearn_suite/results"  # kept: --backends skyward reruns one side only
    session.run("python", "tests/sklearn_suite/compare.py", "--out", results, *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Run the quickstart on the embedded Local provider."""
    session.install(*LOCAL)
    session.run("python", "examples/quickstart.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    session.install(*LOCAL, "ruff", "mypy", "types-paramiko", "boto3-stubs[ec2,ssm]", "numpy")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "skyward", "skyward_joblib", "skyward_sklearn")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation with mkdocs --strict."""
    session.install(*LOCAL, "mkdocs", "mkdocs-material", "mkdocstrings[python]")
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against peers; pass --quick for a short run."""
    session.install(*LOCAL, *BENCH_DEPS)
    try:
        session.install("ray")  # optional peer: the benchmark notes its absence
    except nox.command.CommandFailed:
        session.warn("ray did not install; its rows are skipped")
    session.run("python", "-m", "benchmarks", *session.posargs)
