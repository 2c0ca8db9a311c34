"""Policies: every shipped file validates; broken ones are refused naming the file, the path and the need."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from calm_cli import bounded, policy, schema
from calm_cli.cli import main
from calm_cli.resources import POLICIES, SCHEMAS

SHIPPED = sorted(POLICIES.glob("*.yaml"))


def test_the_expected_policies_ship() -> None:
    assert {p.stem for p in SHIPPED} >= {"default", "latency-first", "energy-saver", "quality-first"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policy_is_valid(path: Path) -> None:
    loaded = policy.load(path)
    assert loaded.name == path.stem
    assert [m.model for m in loaded.fleet] == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    assert loaded.escalation_member.model == "qwen2.5-coder-1.5b"


def _broken(tmp_path: Path, change) -> Path:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    change(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change,where,what", [
    (lambda d: d["weights"].pop("latency"), "weights", "'latency' is a required property"),
    (lambda d: d["cache"].update(eviction="random"), "cache.eviction", "is not one of"),
    (lambda d: d["fleet"][1].update(max_tokens=0), "fleet[1].max_tokens", "less than the minimum"),
    (lambda d: d["goals"].update(latency_p95_ms="fast"), "goals.latency_p95_ms", "is not of type 'number'"),
    (lambda d: d["queue"].update(discipline="lifo"), "queue.discipline", "is not one of"),
    (lambda d: d["escalation"].pop("model"), "escalation", "'model' is a required property"),
    (lambda d: d["fleet"][0].update(model="gpt-9"), "fleet[0].model", "is not in models.lock"),
    (lambda d: d["fleet"][0].update(model="minilm-l6"), "fleet[0].model", "is an encoder"),
    (lambda d: d["cache"].update(pinned=["qwen2.5-coder-7b"]), "cache.pinned[0]", "is not a model of this policy"),
    (lambda d: d["escalation"].update(mode="rewrite"), "escalation.mode", "is not one of"),
    (lambda d: d["escalation"].update(draft="qwen2.5-coder-7b"), "escalation.draft", "is not prompt-lookup, none"),
    (lambda d: d["escalation"].update(draft="smollm2-135m"), "escalation.draft", "drafts need the same tokenizer"),
    (lambda d: d["escalation"].update(draft="qwen2.5-coder-1.5b"), "escalation.draft", "is the member itself"),
    (lambda d: d["fleet"][0].update(draft_tokens=17), "fleet[0].draft_tokens", "greater than the maximum"),
    (lambda d: d["fleet"][0].update(draft_tokens="sometimes"), "fleet[0].draft_tokens", "is not valid under any"),
])
def test_broken_policy_is_refused_with_path(tmp_path: Path, change, where: str, what: str) -> None:
    path = _broken(tmp_path, change)
    with pytest.raises(schema.InvalidFile) as err:
        policy.load(path)
    problems = err.value.problems
    assert any(p.startswith(f"{path}: {where}: ") and what in p for p in problems), problems


def test_every_problem_is_reported_once(tmp_path: Path) -> None:
    def change(d):
        d["weights"]["semantic"] = -1
        d["cache"]["max_loaded"] = 0
        d["unknown_key"] = 1
    problems = pytest.raises(schema.InvalidFile, policy.load, _broken(tmp_path, change)).value.problems
    assert len(problems) == 3


def test_policy_file_that_is_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nfleet: [\n")
    with pytest.raises(schema.InvalidFile, match=r"p.yaml: line \d+"):
        policy.load(path)


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(schema.InvalidFile, match="invalid YAML"):
        policy.load(path)


# -- hostile files: every one is refused with one short line naming the file, never a traceback or a hang ----

BASE = (POLICIES / "default.yaml").read_text(encoding="utf-8")


def _alias_bomb(levels: int, fanout: int = 9) -> str:
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * fanout)}]"]
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * fanout)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


def _refused(path: Path) -> list[str]:
    with pytest.raises(schema.InvalidFile) as err:
        policy.load(path)
    for line in err.value.problems:
        assert line.startswith(f"{path}: ") and len(line.splitlines()) == 1, line
        assert len(line) <= bounded.MAX_PROBLEM_CHARS
    return err.value.problems


@pytest.mark.parametrize("text,what", [
    ("name: x\nfleet: " + "[" * 500 + "]" * 500 + "\n", r"line 2, column \d+: nested deeper than 64 levels"),
    ("".join("  " * i + "a:\n" for i in range(500)), r"line \d+, column \d+: nested deeper than 64 levels"),
    (BASE.replace("max_loaded: 4", "max_loaded: 1" + "0" * 4000), r"line 52, .*an integer of 4001 characters, over 32"),
    (BASE.replace("max_loaded: 4", "max_loaded: 0x" + "f" * 5000), "an integer of 5002 characters"),
    (BASE.replace("budget_mb: 4500", "budget_mb: .nan"), r"cache\.budget_mb: NaN/inf is not allowed"),
    (BASE.replace("  semantic: 1.0", "  semantic: .inf"), r"weights\.semantic: NaN/inf is not allowed"),
    (BASE.replace("  latency: 0.25", "  latency: -.inf"), r"weights\.latency: NaN/inf is not allowed"),
    (_alias_bomb(8), "more than 10000 values once aliases are expanded"),
    ("a: &a [*a]\n", "recursive alias"),
    (BASE + "name: twice\n", "duplicate key 'name'"),
    ("a: 2020-13-01\n", r"line 1, column 4: invalid YAML: invalid timestamp value '2020-13-01'"),
    ("a: !!int x\n", "invalid int value 'x'"),
    ("a: !!int ''\n", "invalid int value ''"),
    ("a: !!bool x\n", "invalid bool value 'x'"),
    ("a: !!timestamp d&a escription\n", "invalid timestamp value 'd&a escription'"),
    (BASE.replace("name: default", 'name: "a\\0b"'), "name: a NUL character is not allowed"),
    (BASE.replace("name: default", 'name: "\\ud800"'), r"name: a lone surrogate"),
    ("1: a\n", r"\(top level\): the key 1 is not a string"),
    ("[" + ", ".join(["1"] * 1500) + "]\n", r"\(top level\): 1500 items, over 1000"),
    (BASE.replace("max_loaded: 4", "max_loaded: 4.0"), r"cache\.max_loaded: 4\.0 is not of type 'integer'"),
])
def test_hostile_policy_is_refused_in_one_line(tmp_path: Path, text: str, what: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8")
    assert any(re.search(what, line) for line in _refused(path)), _refused(path)


def test_alias_bomb_error_stays_short(tmp_path: Path) -> None:
    """An 8-level bomb once printed a 312 MB error line."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(8) + "name: [*l8]\n")
    assert sum(map(len, _refused(path))) < 1000


@pytest.mark.parametrize("field,value", [
    ("max_loaded", 65), ("budget_mb", 10**7 + 1), ("max_waiting", 10**6 + 1), ("timeout_s", 86401),
])
def test_absurd_values_are_out_of_range(tmp_path: Path, field: str, value: int) -> None:
    part = "queue" if field in ("max_waiting", "timeout_s") else "cache"
    path = _broken(tmp_path, lambda d: d[part].update({field: value}))
    assert any(f"{part}.{field}: {value} is greater than the maximum" in p for p in _refused(path))


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    assert _refused(fifo) == [f"{fifo}: is a FIFO, not a regular file"]


def test_devices_and_directories_are_refused(tmp_path: Path) -> None:
    assert _refused(Path("/dev/zero")) == ["/dev/zero: is a character device, not a regular file"]
    assert _refused(tmp_path) == [f"{tmp_path}: is a directory, not a regular file"]
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    assert _refused(link) == [f"{link}: is a character device, not a regular file"]


def test_oversize_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * bounded.MAX_FILE_BYTES + "\n")
    assert _refused(big) == [f"{big}: is over {bounded.MAX_FILE_BYTES} bytes, the limit for this file"]
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    assert _refused(latin) == [f"{latin}: not UTF-8 text (byte 9)"]


def test_many_problems_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("\n".join(f"k{i}: .nan" for i in range(50)) + "\n")
    problems = _refused(path)
    assert len(problems) == schema.MAX_PROBLEMS + 1 and problems[-1].endswith("and 30 more problem(s)")


def _numbers(node: object, path: str = "") -> list[tuple[str, dict]]:
    if isinstance(node, dict):
        found = [(path, node)] if node.get("type") in ("number", "integer") else []
        return found + [x for k, v in node.items() for x in _numbers(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _numbers(v, f"{path}/{i}")]
    return []


@pytest.mark.parametrize("name", ["policy.schema.json", "request.schema.json", "models-lock.schema.json"])
def test_every_number_in_the_schemas_has_a_range(name: str) -> None:
    numbers = _numbers(json.loads((SCHEMAS / name).read_text()))
    assert numbers
    for where, spec in numbers:
        assert {"minimum", "exclusiveMinimum"} & set(spec) and {"maximum", "exclusiveMaximum"} & set(spec), where


# -- calm policy validate / show ---------------------------------------------------------------------------

def test_validate_checks_every_file_and_exits_1(tmp_path: Path) -> None:
    fifo, deep, nan = tmp_path / "fifo.yaml", tmp_path / "deep.yaml", tmp_path / "nan.yaml"
    os.mkfifo(fifo)
    deep.write_text("a: " + "[" * 1000 + "]" * 1000 + "\n")
    nan.write_text(BASE.replace("budget_mb: 4500", "budget_mb: .nan"))
    files = [str(POLICIES / "default.yaml"), str(fifo), "/dev/zero", str(tmp_path), str(deep), str(nan),
             str(tmp_path / "missing.yaml"), str(POLICIES / "quality-first.yaml")]
    result = CliRunner().invoke(main, ["policy", "validate", *files])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.stdout.splitlines() == [f"{files[0]}: ok", f"{files[-1]}: ok"]
    errors = result.stderr.splitlines()
    assert [next(f for f in files if e.startswith(f"{f}: ")) for e in errors] == files[1:-1], errors


def test_validate_exit_codes(tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["policy", "validate", str(POLICIES / "default.yaml")]).exit_code == 0
    assert CliRunner().invoke(main, ["policy", "validate"]).exit_code == 2


def test_show_prints_the_file_it_validated(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["policy", "show", "--policy", str(POLICIES / "energy-saver.yaml")])
    assert result.exit_code == 0
    assert result.stdout == f"# {POLICIES / 'energy-saver.yaml'}\n" + (POLICIES / "energy-saver.yaml").read_text()
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    result = CliRunner().invoke(main, ["policy", "show", "--policy", str(fifo)])
    assert result.exit_code == 2 and f"{fifo}: is a FIFO, not a regular file" in result.stderr


def test_cross_check_problems_are_capped_too(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda d: d.update(fleet=[{"model": f"m{i}", "description": "d" * 10} for i in range(30)]))
    problems = _refused(path)
    assert len(problems) == schema.MAX_PROBLEMS + 1 and problems[-1] == f"{path}: and 10 more problem(s)"
