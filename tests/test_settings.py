"""Settings: one home each, CALM_HOME and XDG honoured, bad values named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from calm_cli import settings
from calm_cli.cli import main
from calm_cli.resources import POLICIES

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


# -- every setting is checked; a bad one is one line naming the variable, at start, exit 2 -----------------

THREADS = "expected an integer from 0 to 1024 (0: onnxruntime chooses)"
WATTS = "expected a number above 0 and at most 1000 (watts)"
ISSUE_CASES = [("CALM_PRECISION", "int3", "expected one of int4, fp32"),
               ("CALM_THREADS", "abc", THREADS), ("CALM_THREADS", "-1", THREADS), ("CALM_THREADS", " 2", THREADS),
               ("CALM_THREADS", "99999", THREADS),
               ("CALM_PROVIDER", "tpu", "expected one of auto, cuda, cpu"),
               ("CALM_SPIN", "2", "expected one of 0, 1"),
               ("CALM_DEVICE_ID", "x", "expected an integer from 0 to 1023"),
               ("CALM_WATTS_PER_CORE", "nan", WATTS), ("CALM_WATTS_PER_CORE", "inf", WATTS),
               ("CALM_WATTS_PER_CORE", "0", WATTS), ("CALM_WATTS_PER_CORE", "1e400", WATTS),
               ("CALM_PIP", "'unclosed", "expected a command line in shell syntax (No closing quotation)"),
               ("CALM_PIP", "   ", "expected a command line, e.g. 'python -m pip'")]


@pytest.mark.parametrize("env,value,expected", ISSUE_CASES)
def test_bad_value_is_one_line(calm_home: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                               expected: str) -> None:
    monkeypatch.setenv(env, value)
    assert settings.problems() == [f"{env}={value!r} is not valid: {expected}"]


@pytest.mark.parametrize("env,value,expected", ISSUE_CASES)
def test_calm_exits_2_naming_the_variable(calm_home: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str,
                                          expected: str) -> None:
    monkeypatch.setenv(env, value)
    result = CliRunner().invoke(main, ["kb", "stats"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr == f"calm: {env}={value!r} is not valid: {expected}\n"
    assert not (calm_home / "data").exists()  # refused before anything was made


def test_home_or_data_dir_that_is_a_file(calm_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("CALM_HOME", str(afile))
    assert settings.problems() == [f"CALM_HOME={str(afile)!r} is not valid: expected a directory, but it is a file"]
    monkeypatch.setenv("CALM_HOME", str(calm_home))
    monkeypatch.setenv("CALM_DATA_DIR", str(afile / "data"))
    assert settings.problems() == [f"CALM_DATA_DIR={str(afile / 'data')!r} is not valid: expected a directory, "
                                   f"but {afile} is a file"]
    result = CliRunner().invoke(main, ["route", "hello"])
    assert result.exit_code == 2 and "CALM_DATA_DIR" in result.stderr and "Traceback" not in result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (unwritable even for root)")
def test_unwritable_home_is_refused_by_commands_that_write(calm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_HOME", "/proc/calm-home")
    assert settings.problems() == []  # a place that may be made: commands that only read it are fine
    lines = settings.problems(writable=["data_dir"])
    assert lines == ["CALM_DATA_DIR (unset, so '/proc/calm-home/data') is not valid: calm cannot write there "
                     "(No such file or directory)"]
    result = CliRunner().invoke(main, ["kb", "stats"])
    assert result.exit_code == 2 and result.stderr == f"calm: {lines[0]}\n"
    assert CliRunner().invoke(main, ["policy", "validate", str(POLICIES / "default.yaml")]).exit_code == 0


def test_writable_directory_is_made_at_start(calm_home: Path) -> None:
    assert settings.problems(writable=["data_dir"]) == []
    assert (calm_home / "data").is_dir() and not list((calm_home / "data").iterdir())  # the probe file is gone


def test_settings_command_marks_invalid_values(calm_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_THREADS", "abc")
    monkeypatch.setenv("CALM_CONFIG_DIR", "/tmp/\udcff")  # an undecodable byte, as os.environ holds it
    result = CliRunner().invoke(main, ["settings"])
    assert result.exit_code == 0, result.output
    line = next(row for row in result.stdout.splitlines() if row.startswith("CALM_THREADS"))
    assert "abc" in line and "INVALID: expected an integer" in line
    assert "'/tmp/\\udcff'" in result.stdout
    rows = {r["env"]: r for r in json.loads(CliRunner().invoke(main, ["settings", "--json"]).stdout)}
    assert rows["CALM_THREADS"]["problem"].startswith("expected an integer from 0 to 1024")
    assert rows["CALM_SPIN"]["problem"] is None


def test_defaults_are_valid(calm_home: Path) -> None:
    assert settings.problems() == []
    assert settings.get("threads") == 1 and settings.get("watts_per_core") == 15.0


def test_models_pull_and_export_refuse_an_unwritable_cache_list_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_CACHE_DIR", "/proc/calm-cache")  # nobody can make a directory under /proc
    for command in (["models", "pull", "smollm2-135m"], ["models", "export", "smollm2-135m"]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "CALM_CACHE_DIR='/proc/calm-cache' is not valid" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    listed = CliRunner().invoke(main, ["models", "list", "--json"])
    assert listed.exit_code == 0 and all(r["state"] == "missing" for r in json.loads(listed.output))
