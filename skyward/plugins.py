"""Plugin discovery and the ``sky.plugins`` namespace.

Plugins are found through the ``skyward`` entry-point group. Built-in plugins
(``joblib``, ``sklearn``) are separate distributions registered exactly like
third-party ones. ``sky.plugins.<name>(**params)`` loads the entry point lazily
and calls it; the result is any object with :func:`skyward.hookimpl` methods.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from skyward import hookspecs
from skyward.errors import PluginError
from skyward.spec import Image, check_pins, deduplicated

if TYPE_CHECKING:
    from skyward.compute import Compute

ENTRY_POINT_GROUP = "skyward"

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "installed",
    "plugin_name",
    "compose_image",
    "worker_initializers",
]


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin: its entry-point name and the distribution that provides it."""

    name: str
    distribution: str
    version: str
    value: str


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed() -> list[PluginInfo]:
    """List the plugins installed in this environment, sorted by name."""
    infos = []
    for name, ep in sorted(_entry_points().items()):
        dist = ep.dist
        infos.append(
            PluginInfo(
                name=name,
                distribution=dist.name if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                value=ep.value,
            )
        )
    return infos


class _Namespace:
    """``sky.plugins``: attribute access resolves an installed plugin factory."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)
        eps = _entry_points()
        if name not in eps:
            names = ", ".join(sorted(eps)) or "none"
            raise AttributeError(
                f"no Skyward plugin named {name!r} is installed (installed: {names}); "
                f"install it, e.g. pip install 'skyward[{name}]', or check the spelling"
            )
        ep = eps[name]
        try:
            factory: Callable[..., Any] = ep.load()
        except Exception as exc:
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "?"
            raise PluginError(
                f"Skyward plugin {name!r} (from {dist}, entry point {ep.value}) failed to "
                f"load: {type(exc).__name__}: {exc}. Reinstall or upgrade that distribution"
            ) from exc
        return factory

    def __dir__(self) -> list[str]:
        return sorted(_entry_points())

    def __repr__(self) -> str:
        return f"<skyward plugins: {', '.join(dir(self)) or 'none'}>"


namespace = _Namespace()


def plugin_name(plugin: object) -> str:
    """A readable name for a plugin object, used in error messages."""
    name = getattr(plugin, "name", None)
    if isinstance(name, str):
        return name
    return type(plugin).__name__ if not inspect.ismodule(plugin) else plugin.__name__


def _spec_signatures(pm: pluggy.PluginManager) -> dict[str, inspect.Signature]:
    """Every hook of :mod:`skyward.hookspecs` and its signature."""
    return {
        name: inspect.signature(getattr(hookspecs, name))
        for name in dir(hookspecs)
        if pm.parse_hookspec_opts(hookspecs, name) is not None
    }


def _check_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """Reject a hook implementation that no hookspec defines, or whose parameters differ."""
    specs = _spec_signatures(pm)
    known = ", ".join(sorted(specs))
    for attribute in dir(plugin):
        opts = pm.parse_hookimpl_opts(plugin, attribute)
        if opts is None:
            continue
        hook = opts.get("specname") or attribute
        if hook not in specs:
            raise PluginError(
                f"plugin {plugin_name(plugin)!r} implements {hook!r}, which is not a Skyward "
                f"hook (known hooks: {known}); check the spelling"
            )
        params = inspect.signature(getattr(plugin, attribute)).parameters
        extra = sorted(set(params) - set(specs[hook].parameters))
        if extra:
            expected = f"{hook}({', '.join(specs[hook].parameters)})"
            raise PluginError(
                f"plugin {plugin_name(plugin)!r}: {hook} takes {', '.join(map(repr, extra))}, "
                f"which the hookspec does not pass; its signature is {expected}"
            )


def manager(plugins: Sequence[object]) -> pluggy.PluginManager:
    """A PluginManager with ``plugins`` registered; rejects objects that implement no hook,
    hooks that no hookspec defines and hooks with parameters the hookspec does not have."""
    pm = pluggy.PluginManager("skyward")
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        if plugin is None or isinstance(plugin, (str, type)):
            hint = (
                f"pass an instance, e.g. sky.plugins.{plugin}()"
                if isinstance(plugin, str)
                else "pass an instance, not the class"
            )
            raise PluginError(f"{plugin!r} is not a plugin object: {hint}")
        _check_hooks(pm, plugin)
        before = len(pm.get_plugins())
        try:
            pm.register(plugin, name=f"{plugin_name(plugin)}-{id(plugin)}")
        except ValueError as exc:
            raise PluginError(
                f"plugin {plugin_name(plugin)!r} was passed twice in plugins=[...]"
            ) from exc
        except pluggy.PluginValidationError as exc:  # e.g. a wrapper that is no generator
            raise PluginError(f"plugin {plugin_name(plugin)!r} has an invalid hook: {exc}") from exc
        if len(pm.get_plugins()) == before or not pm.get_hookcallers(plugin):
            pm.unregister(plugin)
            raise PluginError(
                f"{plugin_name(plugin)!r} implements no Skyward hook: decorate its methods "
                f"with @sky.hookimpl ({' and/or '.join(sorted(_spec_signatures(pm)))})"
            )
    return pm


def _call_each(
    pm: pluggy.PluginManager, plugins: Sequence[object], hook: str, **kwargs: Any
) -> Iterator[tuple[object, Any]]:
    """Call ``hook`` on each plugin that implements it, one at a time, in list order."""
    for plugin in plugins:
        if not any(c.name == hook for c in pm.get_hookcallers(plugin) or []):
            continue
        others = [p for p in pm.get_plugins() if p is not plugin]
        yield plugin, pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)


def _checked(plugin: object, hook: str, value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise PluginError(
            f"{plugin_name(plugin)}.{hook} must return {what}, got {type(value).__name__}"
        )
    return value


def compose_image(image: Image, pm: pluggy.PluginManager, plugins: Sequence[object]) -> Image:
    """Apply each plugin's ``transform_image`` in list order; reject conflicting pins."""
    owners: dict[tuple[str, str], tuple[str, str]] = {}
    check_pins(image.pip, "the Image", owners)
    for plugin in plugins:  # one at a time: each sees the previous plugin's image
        for _, value in _call_each(pm, [plugin], "transform_image", image=image):
            result = _checked(plugin, "transform_image", value, Image, "a sky.Image")
            kept = result.pip[: len(image.pip)] == image.pip
            added = result.pip[len(image.pip) :] if kept else result.pip
            check_pins(added, f"plugin {plugin_name(plugin)!r}", owners)
            image = result
    return deduplicated(image)


@contextlib.contextmanager
def around_client(
    compute: Compute, pm: pluggy.PluginManager, plugins: Sequence[object]
) -> Iterator[None]:
    """Enter every plugin's ``around_client`` in order; leave them in reverse on any exit."""
    with ExitStack() as stack:
        for plugin, value in _call_each(pm, plugins, "around_client", compute=compute):
            context = _checked(
                plugin, "around_client", value, AbstractContextManager, "a context manager"
            )
            stack.enter_context(context)
        yield


_INITIALIZER = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def worker_initializers(pm: pluggy.PluginManager, plugins: Sequence[object]) -> list[str]:
    """Every plugin's ``worker_initializers``, in list order, each name once."""
    names: dict[str, None] = {}
    for plugin, value in _call_each(pm, plugins, "worker_initializers"):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            value = [value]
        for name in value:
            if not isinstance(name, str) or not _INITIALIZER.fullmatch(name):
                raise PluginError(
                    f"{plugin_name(plugin)}.worker_initializers returned {name!r}: return a "
                    "list of 'module:function' names, e.g. ['mypackage.worker:setup']"
                )
            names[name] = None
    return list(names)
