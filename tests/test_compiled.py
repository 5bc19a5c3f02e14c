"""The compiled hot path: built by `make setup`, checked for staleness, reported."""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import shutil
import sysconfig
from pathlib import Path

import pytest

from proxycore.compiled import (
    HOT_MODULES,
    StaleBuild,
    is_compiled,
    require_fresh,
    stale,
    write_manifest,
)

from .lbctl import lb_with


def _can_build() -> bool:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler) is not None and importlib.util.find_spec("mypyc") is not None


@pytest.mark.skipif(not _can_build(), reason="no C compiler or mypyc: the sources run as they are")
def test_every_hot_module_runs_compiled() -> None:
    # `make setup` builds them; a build that failed or was skipped shows here.
    interpreted = [m for m in HOT_MODULES if not is_compiled(importlib.import_module(m))]
    assert not interpreted, f"running from source: {interpreted}; run `make setup`"


def test_an_extension_built_from_another_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "proxycore").mkdir()
    package = tmp_path / "pkg"
    package.mkdir()
    source = package / "hot.py"
    source.write_text("x = 1\n")
    modules = ("pkg.hot",)
    assert stale(modules, tmp_path) == []  # nothing built: the source runs
    (package / ("hot" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    assert stale(modules, tmp_path) == ["pkg.hot"]  # built, but no manifest says from what
    write_manifest(modules, tmp_path)
    assert stale(modules, tmp_path) == []
    source.write_text("x = 2\n")  # edited after the build
    assert stale(modules, tmp_path) == ["pkg.hot"]


def test_this_checkout_is_fresh() -> None:
    require_fresh()  # raises StaleBuild, naming the modules, when it is not
    assert issubclass(StaleBuild, ImportError)


def test_status_says_how_the_hot_path_runs(tmp_path: Path) -> None:
    expected = "compiled" if is_compiled(importlib.import_module("lb.client")) else "interpreted"
    with lb_with(tmp_path) as (lb, _):
        assert lb.status()["hot_path"] == expected
