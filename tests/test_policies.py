"""Policies: every shipped file validates; broken ones are refused naming the file, the path and the need."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calm_cli import policy, schema
from calm_cli.resources import POLICIES

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
