"""Plugin discovery, image composition and around_client ordering."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import skyward as sky

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A plugin defined inline: records enter/exit, optionally fails on enter."""

    def __init__(self, name: str, log: list[Any], fail: bool = False, pin: str | None = None):
        self.name = name
        self.log = log
        self.fail = fail
        self.pin = pin

    @sky.hookimpl
    def transform_image(self, image: sky.Image) -> sky.Image:
        return image.with_pip(self.pin) if self.pin else image

    @sky.hookimpl
    def around_client(self, compute: sky.Compute) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def context() -> Iterator[None]:
            if self.fail:
                self.log.append(("fail", self.name))
                raise RuntimeError(f"{self.name} cannot start")
            self.log.append(("enter", self.name))
            try:
                yield
            finally:
                self.log.append(("exit", self.name))

        return context()


def test_third_party_plugin_is_discovered_through_its_entry_point() -> None:
    assert "hello" in dir(sky.plugins)
    log: list[Any] = []
    plugin = sky.plugins.hello(package="six", log=log, name="hello")
    with sky.Compute(nodes=1, plugins=[plugin]) as compute:
        assert "six" in compute.image.pip
        assert log == [("enter", "hello")]
    assert log == [("enter", "hello"), ("exit", "hello")]


def test_cli_lists_installed_plugins_with_distribution_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "skyward", "plugins"], capture_output=True, text=True, check=True
    ).stdout
    line = next(row for row in out.splitlines() if row.startswith("hello"))
    assert line.split() == ["hello", "skyward-hello", "0.2.0"]


def test_unknown_plugin_name_lists_installed_plugins() -> None:
    with pytest.raises(AttributeError, match=r"no Skyward plugin named 'nope'.*hello"):
        sky.plugins.nope  # noqa: B018


def test_around_client_enters_in_order_and_exits_in_reverse() -> None:
    log: list[Any] = []
    plugins = [Recorder(n, log) for n in ("a", "b", "c")]
    with sky.Compute(nodes=1, plugins=plugins):
        log.append(("body", ""))
    assert log == [
        ("enter", "a"), ("enter", "b"), ("enter", "c"), ("body", ""),
        ("exit", "c"), ("exit", "b"), ("exit", "a"),
    ]


def test_plugin_failing_on_enter_unwinds_the_ones_already_entered(no_agents_left: None) -> None:
    log: list[Any] = []
    plugins = [Recorder("a", log), Recorder("b", log, fail=True), Recorder("c", log)]
    with pytest.raises(RuntimeError, match="b cannot start"):
        with sky.Compute(nodes=1, plugins=plugins):
            log.append(("body", ""))
    assert log == [("enter", "a"), ("fail", "b"), ("exit", "a")]


def test_exception_in_block_still_exits_every_plugin() -> None:
    log: list[Any] = []
    with pytest.raises(KeyError):
        with sky.Compute(nodes=1, plugins=[Recorder("a", log), Recorder("b", log)]):
            raise KeyError("x")
    assert log[-2:] == [("exit", "b"), ("exit", "a")]


def test_transform_image_applies_in_list_order() -> None:
    log: list[Any] = []
    a, b = Recorder("a", log, pin="numpy>=1"), Recorder("b", log, pin="six")
    with sky.Compute(nodes=1, plugins=[a, b], image=sky.Image(pip=["lz4"])) as compute:
        assert compute.image.pip == ("lz4", "numpy>=1", "six")


def test_conflicting_pins_name_both_plugins_and_both_pins() -> None:
    log: list[Any] = []
    a, b = Recorder("first", log, pin="joblib==1.3.0"), Recorder("second", log, pin="joblib==1.4.0")
    with pytest.raises(sky.PinConflictError) as info:
        sky.Compute(nodes=1, plugins=[a, b]).__enter__()
    message = str(info.value)
    for part in ("'first'", "'second'", "joblib==1.3.0", "joblib==1.4.0"):
        assert part in message
    assert log == []  # nothing was started


def test_same_pin_twice_is_not_a_conflict() -> None:
    a, b = Recorder("a", [], pin="six==1.16.0"), Recorder("b", [], pin="six==1.16.0")
    with sky.Compute(nodes=1, plugins=[a, b]) as compute:
        assert compute.image.pip == ("six==1.16.0",)


def test_object_without_hooks_is_rejected() -> None:
    with pytest.raises(sky.PluginError, match="implements no Skyward hook"):
        sky.Compute(plugins=[object()])
    with pytest.raises(sky.PluginError, match=r"sky.plugins.joblib\(\)"):
        sky.Compute(plugins=["joblib"])  # type: ignore[list-item]


def test_plugin_whose_entry_point_fails_to_load_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint

    plugins = sys.modules["skyward.plugins"]  # `skyward.plugins` is the namespace object
    broken = EntryPoint("broken", "no_such_module_xyz:factory", "skyward")
    monkeypatch.setattr(plugins, "_entry_points", lambda: {"broken": broken})
    with pytest.raises(sky.PluginError, match=r"'broken' .*no_such_module_xyz:factory.*failed"):
        sky.plugins.broken  # noqa: B018


class Misspelt:
    """A plugin whose only hook name is misspelt."""

    name = "misspelt"

    @sky.hookimpl
    def transform_imgae(self, image: sky.Image) -> sky.Image:
        return image.with_pip("six")


class HalfMisspelt(Recorder):
    """A working plugin with one extra misspelt hook: the typo must not be ignored."""

    @sky.hookimpl
    def around_clinet(self, compute: sky.Compute) -> None:
        pass


class WrongSignature:
    """``transform_image`` with a parameter the hookspec does not have."""

    name = "wrong-signature"

    @sky.hookimpl
    def transform_image(self, img: sky.Image) -> sky.Image:
        return img


def plugin_error(plugin: object) -> str:
    """The message of the PluginError that ``Compute(plugins=[plugin])`` raises."""
    with pytest.raises(sky.PluginError) as info:
        sky.Compute(plugins=[plugin])
    return str(info.value)


def test_misspelt_hook_is_an_error_naming_it_and_the_known_hooks() -> None:
    message = plugin_error(Misspelt())
    parts = ("'misspelt'", "transform_imgae", "transform_image", "around_client")
    assert all(part in message for part in parts), message
    half = plugin_error(HalfMisspelt("half", []))
    assert re.search(r"'half'.*around_clinet.*around_client", half), half


def test_wrong_hook_signature_is_a_plugin_error_naming_the_hookspec() -> None:
    message = plugin_error(WrongSignature())
    parts = ("'wrong-signature'", "transform_image", "'img'", "transform_image(image)")
    assert all(part in message for part in parts), message


# --- requirements: parsed and compared like pip (packaging) ------------------------------------

WHEEL_URL = "https://files.example.invalid/pkg/pkg-1.0-py3-none-any.whl"


def test_image_accepts_url_marker_and_extras_requirements() -> None:
    from skyward.spec import requirement_name

    lines = [
        f"pkg @ {WHEEL_URL}",
        "pandas; python_version > '3.8'",
        "Scikit_Learn[benchmark]>=1.4,<2",
        "git+https://github.example.invalid/org/thing.git@v1#egg=Thing",
        WHEEL_URL.replace("pkg-1.0", "other_pkg-2.0"),
    ]
    image = sky.Image(pip=lines)
    assert image.pip == tuple(lines)  # passed to the installer as written
    names = [requirement_name(line) for line in lines]
    assert names == ["pkg", "pandas", "scikit-learn", "thing", "other-pkg"]
    with pytest.raises(ValueError, match=r"invalid pip requirement './local/pkg'.*wheelhouse"):
        sky.Image(pip=["./local/pkg"])


def test_equal_specifier_sets_in_another_order_are_not_a_conflict() -> None:
    a, b = Recorder("a", [], pin="numpy<2,>=1.26"), Recorder("b", [], pin="numpy >= 1.26, < 2.0")
    with sky.Compute(nodes=1, plugins=[a, b], image=sky.Image(pip=["numpy>=1.26,<2"])) as compute:
        assert [r for r in compute.image.pip if r.startswith("numpy")] == ["numpy >= 1.26, < 2.0"]


def test_url_pin_against_a_version_pin_names_both_owners() -> None:
    plugin = Recorder("wheel-pinner", [], pin=f"pkg @ {WHEEL_URL}")
    with pytest.raises(sky.PinConflictError) as info:
        sky.Compute(nodes=1, plugins=[plugin], image=sky.Image(pip=["pkg==1.0"])).__enter__()
    message = str(info.value)
    for part in ("the Image", "'pkg==1.0'", "'wheel-pinner'", WHEEL_URL):
        assert part in message, message


def test_marker_requirements_and_extras_survive_composition() -> None:
    plugin = Recorder("p", [], pin="pandas>=2")
    image = sky.Image(pip=["pandas[parquet]", "numpy<2; python_version < '3.9'", "numpy>=2"])
    with sky.Compute(nodes=1, plugins=[plugin], image=image) as compute:
        assert compute.image.pip == (
            "pandas[parquet]>=2",  # the pin wins and keeps the extra asked for
            "numpy<2; python_version < '3.9'",  # pins under other markers are separate
            "numpy>=2",
        )
