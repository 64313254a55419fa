"""An example third-party Skyward plugin, installed from its own distribution.

``sky.plugins.hello(package="six", log=[])`` adds ``package`` to the worker image
and appends ``("enter", name)`` / ``("exit", name)`` to ``log`` around the client.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import skyward as sky


class Hello:
    """Adds one pip package to the image; records enter/exit of the client context."""

    def __init__(self, package: str, log: list[Any] | None, name: str) -> None:
        self.package = package
        self.log = log if log is not None else []
        self.name = name

    @sky.hookimpl
    def transform_image(self, image: sky.Image) -> sky.Image:
        return image.with_pip(self.package)

    @sky.hookimpl
    def around_client(self, compute: sky.Compute) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def record() -> Iterator[None]:
            self.log.append(("enter", self.name))
            try:
                yield
            finally:
                self.log.append(("exit", self.name))

        return record()


def hello(package: str = "six", log: list[Any] | None = None, name: str = "hello") -> Hello:
    """Create the plugin."""
    return Hello(package, log, name)
