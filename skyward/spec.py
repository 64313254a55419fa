"""What a cluster is made of: the worker :class:`Image` and the :class:`Worker` shape.

Both are frozen dataclasses validated at construction, so a mistake is reported
where it is written, not when a remote machine tries to use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from skyward.errors import PinConflictError

__all__ = ["Image", "Worker", "requirement_name"]

Executor = Literal["thread", "process"]
EXECUTORS: tuple[str, ...] = ("thread", "process")

# A bare URL is a pip requirement line too: https://.../pkg-1.0-py3-none-any.whl, git+https://...
_BARE_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9.-]*\+)?(?:https?|file|ftp)://\S+$")


@dataclass(frozen=True, eq=False)
class _Requirement:
    """One parsed pip requirement line; ``text`` is kept as written for the installer."""

    text: str
    name: str  # normalized
    extras: frozenset[str]
    specifier: SpecifierSet
    url: str | None
    marker: str  # "" when the requirement applies everywhere

    @property
    def pinned(self) -> bool:
        """Whether it restricts which version is installed (a specifier or a URL)."""
        return self.url is not None or bool(self.specifier)

    @property
    def key(self) -> tuple[str, str]:
        """Requirements of one package under different markers target different hosts."""
        return self.name, self.marker

    def with_extras(self, extras: Iterable[str]) -> str:
        """This requirement as PEP 508 text, with ``extras`` instead of its own."""
        pin = f" @ {self.url} " if self.url is not None else str(self.specifier)
        marker = f"; {self.marker}" if self.marker else ""
        return f"{self.name}[{','.join(sorted(extras))}]{pin}{marker}".strip()

    def same_pin(self, other: _Requirement) -> bool:
        """Equal URLs and equal specifier *sets* (``>=1,<2`` is ``<2,>=1``)."""
        return self.url == other.url and self.specifier == other.specifier


def _url_name(url: str) -> str | None:
    """The distribution name of a bare URL requirement: ``#egg=`` or the file name."""
    if not _BARE_URL.match(url):
        return None
    parts = urlsplit(url)
    egg = re.search(r"(?:^|&)egg=([^&]+)", parts.fragment)
    if egg:
        return canonicalize_name(egg.group(1))
    filename = parts.path.rsplit("/", 1)[-1]
    try:
        if filename.endswith(".whl"):
            return canonicalize_name(parse_wheel_filename(filename)[0])
        return canonicalize_name(parse_sdist_filename(filename)[0])
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> _Requirement:
    try:
        parsed = Requirement(text)
    except InvalidRequirement as exc:
        name = _url_name(text.strip())
        if name is None:
            reason = str(exc).splitlines()[0]
            raise ValueError(
                f"invalid pip requirement {text!r} ({reason}): use a name with optional "
                "extras, version specifiers and markers, or 'name @ URL', e.g. 'numpy', "
                "'scikit-learn==1.5.2', 'pandas[parquet]>=2', \"pandas; python_version > '3.8'\", "
                "'pkg @ https://host/pkg-1.0-py3-none-any.whl'; for local wheels use "
                "sky.Image(wheelhouse=...)"
            ) from None
        return _Requirement(text, name, frozenset(), SpecifierSet(), text.strip(), "")
    return _Requirement(
        text=text,
        name=canonicalize_name(parsed.name),
        extras=frozenset(parsed.extras),
        specifier=parsed.specifier,
        url=parsed.url,
        marker=str(parsed.marker) if parsed.marker is not None else "",
    )


def requirement_name(requirement: str) -> str:
    """Return the normalized distribution name of a pip requirement string.

    Accepts what pip accepts on its command line for a package: PEP 508 requirements
    (extras, version specifiers, markers, ``name @ URL``) and bare wheel, sdist or
    ``#egg=`` URLs. Raises :class:`ValueError` naming the accepted forms otherwise.
    """
    return _parse(requirement).name


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
        pip: pip requirements installed on each node: anything pip accepts for a
            package, e.g. ``"numpy>=1.26,<2"``, ``"pandas[parquet]"``,
            ``"pandas; python_version > '3.8'"``, ``"pkg @ https://host/pkg.whl"``.
        env: environment variables set for the agent and its tasks (on SSH and AWS
            hosts also for the package installer, e.g. ``UV_INDEX_URL``). They reach
            hosts over the SSH channel, never on a command line, and ``repr`` shows
            only their names.
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

    def __repr__(self) -> str:
        # env often holds secrets (index URLs with tokens): names only, values hidden.
        env = "{" + ", ".join(f"{key!r}: '***'" for key in self.env) + "}"
        return (
            f"Image(python={self.python!r}, pip={self.pip!r}, env={env}, "
            f"wheelhouse={self.wheelhouse!r})"
        )

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


def check_pins(
    added: Iterable[str], owner: str, owners: dict[tuple[str, str], tuple[str, str]]
) -> None:
    """Raise :class:`PinConflictError` if ``added`` pins a package already pinned differently.

    ``owners`` maps a package (name and marker) to ``(who pinned it, the requirement)`` and
    is updated in place. Equal specifier sets in another order, or unpinned requirements,
    are no conflict; one package under different markers is pinned separately.
    """
    for text in added:
        requirement = _parse(text)
        if not requirement.pinned:
            continue
        first = owners.setdefault(requirement.key, (owner, text))
        if not requirement.same_pin(_parse(first[1])):
            name = requirement.name
            raise PinConflictError(
                f"conflicting pins for {name!r}: {first[0]} requires {first[1]!r} but "
                f"{owner} requires {text!r}; give both the same version (e.g. the "
                "plugin's version=...) or drop one of the pins"
            )


def deduplicated(image: Image) -> Image:
    """One requirement per package (and marker): a pinned requirement wins over an unpinned
    one, and keeps the extras that the others asked for."""
    chosen: dict[tuple[str, str], _Requirement] = {}
    extras: dict[tuple[str, str], frozenset[str]] = {}
    for text in image.pip:
        requirement = _parse(text)
        extras[requirement.key] = extras.get(requirement.key, frozenset()) | requirement.extras
        if requirement.key not in chosen or requirement.pinned:
            chosen[requirement.key] = requirement
    pip = []
    for key, requirement in chosen.items():
        missing = extras[key] - requirement.extras
        pip.append(requirement.with_extras(extras[key]) if missing else requirement.text)
    return Image(python=image.python, pip=tuple(pip), env=image.env, wheelhouse=image.wheelhouse)
