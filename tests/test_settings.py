"""Settings: one home each, CALM_HOME and XDG honoured, bad values named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from calm_cli import settings

PACKAGE = Path(settings.__file__).parent


def test_every_setting_has_a_calm_variable_and_a_description() -> None:
    for s in settings.SETTINGS.values():
        assert s.env.startswith("CALM_") and s.env == "CALM_" + s.name.upper()
        assert len(s.description) > 20


def test_no_module_reads_calm_variables_outside_settings() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "settings.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"environ(\.get)?\s*[\[(]\s*['\"]CALM_", text), f"{path} reads a CALM_ variable itself"


def test_calm_home_overrides_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv("CALM_CACHE_DIR", raising=False)
    monkeypatch.delenv("CALM_HOME", raising=False)
    assert settings.path("cache_dir") == tmp_path / "xdg-cache" / "calm"
    monkeypatch.setenv("CALM_HOME", str(tmp_path / "home"))
    assert settings.path("cache_dir") == tmp_path / "home" / "cache"
    assert settings.path("data_dir") == tmp_path / "home" / "data"
    monkeypatch.setenv("CALM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert settings.path("cache_dir") == tmp_path / "elsewhere"


def test_relative_xdg_is_ignored_as_the_spec_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALM_HOME", raising=False)
    monkeypatch.delenv("CALM_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "relative/path")
    assert settings.path("data_dir") == Path.home() / ".local/share/calm"


@pytest.mark.parametrize("env,value", [("CALM_THREADS", "two"), ("CALM_THREADS", "-1"),
                                       ("CALM_PROVIDER", "tpu"), ("CALM_WATTS_PER_CORE", "x"),
                                       ("CALM_SPIN", "yes")])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    name = env.removeprefix("CALM_").lower()
    with pytest.raises(settings.SettingError, match=env):
        settings.get(name)


@pytest.mark.parametrize("spin", ["0", "1"])
def test_spin_setting_reaches_the_session_options(monkeypatch: pytest.MonkeyPatch, spin: str) -> None:
    from calm_cli.engine.session import session_options

    monkeypatch.setenv("CALM_SPIN", spin)
    monkeypatch.setenv("CALM_THREADS", "2")
    options = session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spin
    assert options.intra_op_num_threads == 2
