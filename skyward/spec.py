"""What a cluster is made of: the worker :class:`Image` and the :class:`Worker` shape.

Both are frozen dataclasses validated at construction, so a mistake is reported
where it is written, not when a remote machine tries to use it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Image", "Worker", "PinConflictError", "requirement_name"]

Executor = Literal["thread", "process"]
EXECUTORS: tuple[str, ...] = ("thread", "process")

# PEP 508 subset: a name, optional extras, optional version specifiers.
_REQUIREMENT = re.compile(
    r"""^\s*
    (?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)
    (?:\[(?P<extras>[A-Za-z0-9._,\s-]+)\])?
    \s*(?P<spec>(?:(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*)
    \s*$""",
    re.VERBOSE,
)


class PinConflictError(ValueError):
    """Two plugins (or a plugin and the image) require one package at different versions."""


def requirement_name(requirement: str) -> str:
    """Return the normalized distribution name of a pip requirement string."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(
            f"invalid pip requirement {requirement!r}: use a package name with optional "
            "extras and version specifiers, e.g. 'numpy', 'scikit-learn==1.5.2', 'pandas>=2'"
        )
    return re.sub(r"[-_.]+", "-", match.group("name")).lower()


def _requirement_spec(requirement: str) -> str:
    match = _REQUIREMENT.match(requirement)
    assert match is not None
    return re.sub(r"\s+", "", match.group("spec") or "")


def _default_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Worker:
    """How each node runs tasks.

    Args:
        concurrency: tasks run at the same time on each node (slots per node).
        executor: ``"thread"`` runs tasks on threads of the agent process;
            ``"process"`` runs each slot in its own process, for code that holds the GIL.
    """

    concurrency: int = 1
    executor: Executor = "thread"

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise TypeError(
                f"Worker(concurrency=...) must be an int >= 1, got {self.concurrency!r}"
            )
        if self.concurrency < 1:
            raise ValueError(
                f"Worker(concurrency={self.concurrency}) is invalid: each node needs at least "
                "one slot, use concurrency=1 or more"
            )
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"unknown executor {self.executor!r}: use Worker(executor='thread') or "
                "Worker(executor='process')"
            )


@dataclass(frozen=True)
class Image:
    """What every worker node has installed.

    Args:
        python: ``"major.minor"`` Python version for remote nodes (defaults to the client's).
        pip: pip requirement strings installed on each node.
        env: environment variables set for the agent and its tasks (on SSH and AWS
            hosts also for the package installer, e.g. ``UV_INDEX_URL``).
        wheelhouse: a local folder of wheels; when set, remote installs use only
            these wheels (``--no-index``), for hosts without internet access.
    """

    python: str = field(default_factory=_default_python)
    pip: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    wheelhouse: str | Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.pip, str):
            raise TypeError(
                f"Image(pip=...) takes a list of requirements, got the string {self.pip!r}"
            )
        object.__setattr__(self, "pip", tuple(self.pip))
        object.__setattr__(self, "env", dict(self.env))
        if not re.fullmatch(r"3\.\d+", self.python):
            raise ValueError(
                f"Image(python={self.python!r}) is invalid: give 'major.minor', e.g. '3.11'"
            )
        for requirement in self.pip:
            if not isinstance(requirement, str):
                raise TypeError(f"Image(pip=...) entries must be strings, got {requirement!r}")
            requirement_name(requirement)
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"Image(env=...) must map str to str, got {key!r}: {value!r}")
        if self.wheelhouse is not None and not Path(self.wheelhouse).is_dir():
            raise ValueError(
                f"Image(wheelhouse={str(self.wheelhouse)!r}) is not a directory: build it "
                "with 'pip wheel -w DIR PACKAGES' or 'uv pip download'"
            )

    def __hash__(self) -> int:
        return hash(self.digest())

    def with_pip(self, *requirements: str) -> Image:
        """Return a copy with ``requirements`` appended."""
        return Image(
            python=self.python,
            pip=(*self.pip, *requirements),
            env=self.env,
            wheelhouse=self.wheelhouse,
        )

    def with_env(self, env: Mapping[str, str]) -> Image:
        """Return a copy with ``env`` merged over this image's environment."""
        return Image(
            python=self.python, pip=self.pip, env={**self.env, **env}, wheelhouse=self.wheelhouse
        )

    def requirements(self) -> dict[str, str]:
        """Map normalized package names to their requirement string (last one wins)."""
        return {requirement_name(r): r for r in self.pip}

    def digest(self) -> str:
        """A stable content hash: same image, same remote environment."""
        wheels: list[str] = []
        if self.wheelhouse is not None:
            wheels = sorted(p.name for p in Path(self.wheelhouse).iterdir())
        payload = json.dumps(
            {
                "python": self.python,
                "pip": sorted(set(self.pip)),
                "wheels": wheels,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_pins(added: Iterable[str], plugin: str, owners: dict[str, tuple[str, str]]) -> None:
    """Raise :class:`PinConflictError` if ``added`` pins a package already pinned differently.

    ``owners`` maps package name to ``(who pinned it, specifier)`` and is updated in place.
    """
    for requirement in added:
        spec = _requirement_spec(requirement)
        if not spec:
            continue
        name = requirement_name(requirement)
        owner = owners.get(name)
        if owner is None:
            owners[name] = (plugin, spec)
        elif owner[1] != spec:
            raise PinConflictError(
                f"conflicting pins for {name!r}: {owner[0]} requires {name}{owner[1]} but "
                f"{plugin} requires {name}{spec}; give both the same version (e.g. the "
                "plugin's version=...) or drop one of the pins"
            )


def deduplicated(image: Image) -> Image:
    """One requirement per package: a pinned requirement wins over an unpinned one."""
    chosen: dict[str, str] = {}
    for requirement in image.pip:
        name = requirement_name(requirement)
        if name not in chosen or _requirement_spec(requirement):
            chosen[name] = requirement
    return Image(
        python=image.python, pip=tuple(chosen.values()), env=image.env, wheelhouse=image.wheelhouse
    )
