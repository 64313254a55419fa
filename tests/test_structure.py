"""The layout's import rules (issue 13): the agent carries nothing of the client, and
providers and the scheduler do not know each other. Checked on the source (an ast walk
of ``skyward/**.py``) and on a real interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from joblib import Parallel, delayed

import skyward
import skyward as sky
from skyward.bootstrap import environment
from skyward.spec import requirement_name

ROOT = Path(skyward.__file__).parent
# What the worker side may load besides the standard library.
AGENT_THIRD_PARTY = {"cloudpickle", "lz4"}
CLIENT_ONLY = (
    "pluggy",
    "paramiko",
    "boto3",
    "packaging",
    "skyward.compute",
    "skyward.scheduler",
    "skyward.providers",
    "skyward.plugins",
    "skyward.spec",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in ROOT.rglob("*.py")}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that runs, function bodies included; ``if TYPE_CHECKING:`` bodies not."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                yield child
                yield from runtime_nodes(child)
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """The absolute module names a file imports at run time (with ``from x import y``
    counted as ``x`` and, when ``x.y`` is a module of ours, ``x.y``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES
            )
    return found


def closure(start: str) -> set[str]:
    """Every module that importing ``start`` loads, by the static imports (parents too)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        if name in MODULES:
            todo.extend(imports_of(MODULES[name]))
    return seen


def test_the_agent_imports_nothing_of_the_client() -> None:
    loaded = closure("skyward.agent") | closure("skyward.agent.__main__")
    ours = {m for m in loaded if m.split(".")[0] == "skyward"}
    allowed = ("skyward.agent", "skyward.wire", "skyward.errors")
    client_side = {
        m
        for m in ours
        if m != "skyward" and not any(m == a or m.startswith(a + ".") for a in allowed)
    }
    assert not client_side, f"the agent imports client modules: {sorted(client_side)}"
    others = {m.split(".")[0] for m in loaded} - {"skyward", "__future__"}
    third_party = others - set(sys.stdlib_module_names)
    assert third_party <= AGENT_THIRD_PARTY, sorted(third_party)


def test_providers_and_the_scheduler_do_not_import_each_other() -> None:
    providers = {
        m for m in MODULES if m == "skyward.providers" or m.startswith("skyward.providers.")
    }
    for name in providers:
        imported = imports_of(MODULES[name])
        assert "skyward.scheduler" not in imported, f"{name} imports the scheduler"
    imported = imports_of(MODULES["skyward.scheduler"])
    assert not any(m.startswith("skyward.providers") for m in imported), imported


def test_importing_the_agent_loads_nothing_of_the_client() -> None:
    probe = "import sys, json, skyward.agent; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout))
    found = sorted(m for m in loaded for c in CLIENT_ONLY if m == c or m.startswith(c + "."))
    assert not found, f"import skyward.agent loaded {found}"
    assert {"skyward.wire", "cloudpickle", "lz4"} <= loaded  # the probe is not vacuous


def test_the_public_api_is_still_there_and_loaded_on_use() -> None:
    probe = (
        "import sys, skyward as sky; before = 'skyward.compute' in sys.modules; "
        "sky.Compute; import skyward.compute; print(before, sky.plugins.joblib.__name__, "
        "sorted(set(sky.__all__) - set(dir(sky))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    # Loaded on first use only; `sky.plugins` stays the plugin namespace once
    # `skyward.plugins` (the module) is imported.
    assert out.stdout.split() == ["False", "joblib", "[]"], out.stdout + out.stderr
    for name in skyward.__all__:
        assert getattr(skyward, name) is not None


def test_worker_environments_install_no_client_dependency() -> None:
    packages = environment._packages(skyward.Image(), exclude=set())
    names = {requirement_name(p) for p in packages}
    assert {"cloudpickle", "lz4"} <= names
    assert not names & {"pluggy", "packaging", "paramiko", "boto3"}, packages


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_tasks_run_on_a_worker_without_the_clients_dependencies(
    tmp_path: Path, executor: str
) -> None:
    """What a worker runs (the agent, map chunks, joblib batches, plugin initializers)
    needs none of pluggy, packaging, paramiko, boto3: there, importing them fails."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("pluggy", "packaging", "paramiko", "boto3"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} on the worker')\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={blocked}:"$PYTHONPATH" exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    worker = sky.Worker(2, executor=executor)  # type: ignore[arg-type]
    plugins = [sky.plugins.sklearn()]
    with sky.Compute(sky.Local(python=str(python)), worker=worker, plugins=plugins) as compute:
        assert compute.submit(pow, 2, 5).result(60) == 32
        assert list(compute.map(abs, range(-5, 5), chunksize=3)) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
        assert Parallel(n_jobs=-1)(delayed(abs)(-i) for i in range(20)) == list(range(20))
