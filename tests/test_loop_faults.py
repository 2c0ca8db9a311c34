"""The loop's failure paths on the tiny fleet, with real faults: a member whose model file is damaged or gone
falls back to the next candidate (within the hard goals first) and is named in `fallback_from`; when every
member fails the record says `model_failed` naming each; an escalation that fails keeps the first answer and is
recorded; and an answer that may still be escalated is held back, and only the final answer streams."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from calm_cli import policy as policies
from calm_cli.fleet.store import Store
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import Calm
from calm_cli.resources import POLICIES, SCHEMAS

RESPONSE = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "response.schema.json").read_text()))
QUERY = "What is the capital of France?"


@pytest.fixture
def store(tiny_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """A private copy of the tiny fleet, so a test may damage it."""
    monkeypatch.setenv("CALM_PRECISION", "fp32")
    shutil.copytree(tiny_home / "cache", tmp_path / "cache")
    return Store(tmp_path / "cache")


def make_loop(store: Store, tmp_path: Path, **changes) -> Calm:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return assemble(policies.load(path), store, open_knowledge(tmp_path / "kb.sqlite"))


def damage(store: Store, name: str) -> None:
    for graph in store.export_dir(name, "fp32").glob("model*.onnx"):
        graph.write_bytes(b"not an onnx graph")


def failures(calm: Calm) -> list[tuple[str, str]]:
    return [(r["model"], r["error_code"]) for m in calm.members for r in calm.kb.recent(m) if r["error_code"]]


def test_a_damaged_member_falls_back_to_the_next_candidate(store: Store, tmp_path: Path) -> None:
    calm = make_loop(store, tmp_path, escalation={"enabled": False})
    decision = calm.plan(calm.embed([QUERY])[0])
    damage(store, decision.model)
    record = calm.answer({"id": 1, "query": QUERY, "max_tokens": 2})
    RESPONSE.validate(record)
    expected = next(c.model for c in sorted(decision.candidates, key=lambda c: c.filtered_by is not None)
                    if c.model != decision.model)
    assert record["error"] is None and record["model"] == expected
    assert record["routing"]["fallback_from"] == decision.model
    assert failures(calm) == [(decision.model, "model_failed")]


def test_every_member_failing_is_model_failed_naming_each(store: Store, tmp_path: Path) -> None:
    calm = make_loop(store, tmp_path, escalation={"enabled": False})
    for member in calm.policy.fleet:
        damage(store, member.model)
    record = calm.answer({"id": 2, "query": QUERY, "max_tokens": 2})
    RESPONSE.validate(record)
    assert record["error"]["code"] == "model_failed"
    for member in calm.policy.fleet:
        assert member.model in record["error"]["message"]
    assert sorted(failures(calm)) == sorted((m.model, "model_failed") for m in calm.policy.fleet)


def test_a_failed_escalation_keeps_the_first_answer_and_is_recorded(store: Store, tmp_path: Path) -> None:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    calm = make_loop(store, tmp_path, escalation={**data["escalation"], "confidence_threshold": 1.0})
    damage(store, calm.policy.escalation_member.model)
    record = calm.answer({"id": 3, "query": QUERY, "max_tokens": 2})
    RESPONSE.validate(record)
    assert record["error"] is None and record["model"] in {m.model for m in calm.policy.fleet}
    assert record["routing"]["escalated_from"] is None
    assert "escalation to qwen2.5-coder-1.5b failed" in record["routing"]["reason"]
    assert failures(calm) == [("qwen2.5-coder-1.5b", "model_failed")]


def test_an_answer_that_may_be_escalated_streams_only_the_final_answer(store: Store, tmp_path: Path) -> None:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    calm = make_loop(store, tmp_path, escalation={**data["escalation"], "confidence_threshold": 1.0})
    pieces: list[str] = []
    record = calm.answer({"id": 4, "query": QUERY, "max_tokens": 6}, on_text=pieces.append)
    assert record["routing"]["escalated_from"] is not None  # random weights are never confident
    assert "".join(pieces) == record["answer"]  # the first answer was held back; only the final one streamed


def test_an_answer_that_cannot_be_escalated_streams_piece_by_piece(store: Store, tmp_path: Path) -> None:
    calm = make_loop(store, tmp_path, escalation={"enabled": False})
    pieces: list[str] = []
    record = calm.answer({"id": 5, "query": QUERY, "max_tokens": 12}, on_text=pieces.append)
    assert "".join(pieces) == record["answer"] and len(pieces) > 1
