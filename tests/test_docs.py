"""Every ```python example of the docs and the README runs, so the docs cannot drift.

One case per page: the page's blocks run in order, in one fresh interpreter
(``sys.executable``) whose cwd is a temp dir, on the Local provider. Each block
is compiled with the page as its file name and its real line numbers, so a
failure points into the markdown. A block whose fence is preceded by
``<!-- docs-test: skip (reason) -->`` is not run; the reason is mandatory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import agent_processes, wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# A hang guard, not a speed check: a page with several searches on a loaded 2-core machine.
PAGE_TIMEOUT = 240.0
PYTHON = ("python", "py")

SKIP = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b(.*?)-->\s*$")
SKIP_REASON = re.compile(r"^\s*\((?P<reason>[^)]*\S[^)]*)\)\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

# Runs the blocks as __main__ (functions defined there travel by value, as in a script).
RUNNER = """
import json, sys
namespace = sys.modules["__main__"].__dict__
for block in json.load(open(sys.argv[1])):
    code = "\\n" * (block["line"] - 1) + block["source"]
    exec(compile(code, block["path"], "exec"), namespace)
"""


@dataclass
class Block:
    """One fenced code block of a page."""

    line: int  # line number of the first line of code
    language: str
    source: str
    skip: str | None  # the skip marker's text, when the block is marked


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown page, with the skip marker each one carries."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, indent = match["fence"], len(match["indent"])
        language = (match["info"].split() or [""])[0].strip("{}.")
        marker = SKIP.match(lines[i - 1]) if i > 0 else None
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        found.append(Block(i + 2, language, "\n".join(body) + "\n", marker[1] if marker else None))
        i = j + 1
    return found


def skips_without_reason(page: Path) -> list[int]:
    """Line numbers of skip markers on python blocks that give no reason."""
    return [
        b.line - 2
        for b in blocks(page)
        if b.language in PYTHON and b.skip is not None and not SKIP_REASON.match(b.skip)
    ]


def test_block_parser_reads_languages_markers_and_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nif x:\n    x = 1\n```\n<!-- docs-test: skip (needs SSH hosts) -->\n"
        "```python\ny = 2\n```\n```bash\nls\n```\n- item\n\n    ```python\n    z = 3\n    ```\n"
    )
    got = blocks(page)
    assert [(b.line, b.language, b.source) for b in got] == [
        (3, "python", "if x:\n    x = 1\n"),
        (8, "python", "y = 2\n"),
        (11, "bash", "ls\n"),
        (16, "python", "z = 3\n"),
    ]
    assert [b.skip for b in got] == [None, " (needs SSH hosts) ", None, None]
    assert skips_without_reason(page) == []


def test_skip_marker_without_reason_is_reported(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- docs-test: skip -->\n```python\nx = 1\n```\n"
        "<!-- docs-test: skip () -->\n```python\ny = 1\n```\n"
    )
    assert skips_without_reason(page) == [1, 5]


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    assert not skips_without_reason(page), (
        f"{_page_id(page)}, lines {skips_without_reason(page)}: a docs-test skip marker needs "
        "a reason: <!-- docs-test: skip (why this example cannot run on Local) -->"
    )
    runnable = [b for b in blocks(page) if b.language in PYTHON and b.skip is None]
    if not runnable:
        return
    script = tmp_path / "blocks.json"
    script.write_text(
        json.dumps([{"line": b.line, "source": b.source, "path": str(page)} for b in runnable])
    )
    marker = uuid.uuid4().hex
    done: subprocess.CompletedProcess[str] | subprocess.TimeoutExpired
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUNNER, str(script)],
            cwd=tmp_path,
            env={**os.environ, "SKYWARD_DOCS_TEST": marker},
            capture_output=True,
            text=True,
            timeout=PAGE_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        done = exc
    agents_gone = wait_until(lambda: not _agents_of(marker), 10.0)
    assert not isinstance(done, subprocess.TimeoutExpired), (
        f"{_page_id(page)}: examples did not finish in {PAGE_TIMEOUT:.0f}s\n{done.stderr!r}"
    )
    assert done.returncode == 0, (
        f"{_page_id(page)}: an example failed (exit {done.returncode})\n"
        f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    )
    assert agents_gone, f"{_page_id(page)}: its examples left agent processes running"


def _agents_of(marker: str) -> list[psutil.Process]:
    """Agent processes started by the examples of one page (they inherit its environment)."""
    found = []
    for proc in agent_processes():
        try:
            if proc.environ().get("SKYWARD_DOCS_TEST") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
