"""scikit-learn's callback messages reach the client over Skyward's own channel.

scikit-learn's callbacks (``est.set_callbacks(ProgressBar())``, ``ScoringMonitor``)
keep their state on the main process: each opens a listener there
(``sklearn.callback._transport.open_listener``) and the copies that run in
workers ``send`` their messages to it over a local socket, waiting until the
message is consumed. A Skyward node cannot use that socket: over SSH or AWS it
is on another machine, and on Local nodes the slots of one agent would share
one connection. So:

- on each worker (:func:`install`, a worker initializer of the sklearn plugin),
  ``_transport.Client`` returns, for a listener that lives on the client, a
  connection whose ``send`` goes through :func:`skyward.agent.emit` and so
  returns only once the client consumed the message, as scikit-learn's does;
  listeners the client does not have keep scikit-learn's own socket;
- on the client (:func:`answer`, registered with ``Compute.on_message``), the
  listener's own message consumer takes the message, on a thread of its own.

Importing this module imports neither scikit-learn nor the Skyward client.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
from collections.abc import Callable
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["TOPIC", "answer", "install"]

TOPIC = "skyward_sklearn.callback"
_TRANSPORT = "sklearn.callback._transport"


# --- on the worker ---------------------------------------------------------------------


def install() -> None:
    """Worker initializer: relay callback messages once scikit-learn's transport is imported.

    Importing scikit-learn takes seconds and most tasks never need it, so the
    transport is patched when a task first imports it, not when the agent starts.
    """
    transport = sys.modules.get(_TRANSPORT)
    if transport is not None:
        _patch(transport)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _emit(request: tuple[str, str, Any]) -> Any:
    from skyward.agent import emit

    return emit(TOPIC, request)


class _Relay:
    """Stands for a connection to a listener on the client (the part of it ``send`` uses)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def send(self, message: Any) -> None:
        _emit(("send", self.address, message))

    def recv(self) -> None:
        """The acknowledgement: ``send`` has already waited for it."""

    def close(self) -> None:
        """Nothing to close: the node's channel is Skyward's."""


def _patch(transport: ModuleType) -> None:
    original: Callable[..., Any] = transport.Client
    if hasattr(original, "__wrapped__"):
        return

    @functools.wraps(original)
    def client(address: str, *args: Any, authkey: bytes | None = None, **kwargs: Any) -> Any:
        if _emit(("listening", address, authkey)):
            return _Relay(address)
        return original(address, *args, authkey=authkey, **kwargs)

    setattr(transport, "Client", client)  # noqa: B010 - a module, not a typed object


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds scikit-learn's transport module through the other finders, then patches it."""

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _TRANSPORT:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec: ModuleSpec | None = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


# --- on the client ---------------------------------------------------------------------


def answer(request: tuple[str, str, Any]) -> bool | None:
    """``Compute.on_message`` handler for :data:`TOPIC`: a worker's request about a listener.

    ``("listening", address, authkey)``: whether that listener is open on this process.
    ``("send", address, message)``: hand ``message`` to the listener's consumer; a closed
    listener raises ``ConnectionRefusedError``, as scikit-learn's socket would.
    """
    transport = importlib.import_module(_TRANSPORT)
    operation, address, payload = request
    if operation == "listening":
        listener = transport._listeners.get(address)
        return listener is not None and getattr(listener, "_authkey", payload) == payload
    consumer = transport._message_consumers.get(address)
    if consumer is None:
        raise ConnectionRefusedError(
            f"scikit-learn's callback listener {address} is closed on the client"
        )
    consumer(payload)
    return None
