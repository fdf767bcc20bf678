"""``--app MODULE:FACTORY``: the app package in the working directory wins over an installed namesake."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from zmqfed.app import load_factory
from zmqfed.errors import ConfigError


@pytest.fixture
def clean_modules():
    saved = {n: m for n, m in sys.modules.items() if n == "examples" or n.startswith("examples.")}
    yield
    for name in [n for n in sys.modules if n == "examples" or n.startswith("examples.")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_an_installed_namesake_does_not_shadow_the_working_directorys_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None
) -> None:
    # What opacus does: a top-level package called ``examples`` in site-packages.
    installed = types.ModuleType("examples")
    installed.__path__ = [str(tmp_path / "site-packages" / "examples")]
    sys.modules["examples"] = installed
    app = tmp_path / "work" / "examples"
    app.mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "mine.py").write_text("def factory(ctx):\n    return 'from the working directory'\n")
    monkeypatch.chdir(tmp_path / "work")
    factory = load_factory("examples.mine:factory")
    assert factory(None) == "from the working directory"
    assert sys.modules["examples"] is not installed


def test_without_a_package_in_the_working_directory_the_import_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert callable(load_factory("zmqfed.app:load_factory"))
    with pytest.raises(ConfigError, match="cannot import 'no_such_app'"):
        load_factory("no_such_app:factory")
