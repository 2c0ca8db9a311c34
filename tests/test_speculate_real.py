"""Speculative decoding and escalation by verification on the real fleet, through the real loop: an escalated
answer (SmolLM2's answer checked by Qwen2.5-Coder-1.5B: another tokenizer) is the 1.5B's own greedy answer, and
a member whose policy names a draft member borrows it through the model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from calm_cli import policy
from calm_cli.cli import main
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import Calm
from calm_cli.resources import POLICIES

pytestmark = pytest.mark.fleet

QUESTION = "Write a Python function that returns the square of a number."
LARGER = "qwen2.5-coder-1.5b"


@pytest.fixture(scope="module")
def exported(fleet_store) -> None:
    for name in ("minilm-l6", "smollm2-135m", "qwen2.5-coder-0.5b", LARGER):
        result = CliRunner().invoke(main, ["models", "export", name])
        assert result.exit_code == 0, result.output


def _calm(tmp_path: Path, store, fleet: list[dict], escalation: dict) -> Calm:
    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    data["fleet"], data["escalation"] = fleet, escalation
    data["cache"]["prefetch"] = False
    tmp_path.mkdir()
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return assemble(policy.load(path), store, open_knowledge(tmp_path / "kb.sqlite"))


def test_an_escalated_answer_is_the_larger_members_own(exported, fleet_store, tmp_path: Path) -> None:
    """Mode verify: the 1.5B checks SmolLM2's answer (re-encoded with its own tokenizer) and goes on from the
    first disagreement; the answer equals the 1.5B's forced (never escalated) greedy answer, and the record
    says how much of the first answer was checked and kept."""
    smol = {"model": "smollm2-135m", "description": "Anything at all, a general assistant.", "max_tokens": 48}
    calm = _calm(tmp_path / "verify", fleet_store, [smol],
                 {"enabled": True, "model": LARGER, "description": "Code.", "confidence_threshold": 1.0,
                  "max_tokens": 48, "mode": "verify"})
    try:
        own = calm.answer({"id": "own", "query": QUESTION, "model": LARGER})
        record = calm.answer({"id": "esc", "query": QUESTION})
    finally:
        calm.close()
    assert own["error"] is None and own["metrics"]["draft"] is None  # batched: one token per step
    assert record["model"] == LARGER and record["routing"]["escalated_from"] == "smollm2-135m"
    metrics = record["metrics"]
    assert metrics["draft"] == "answer" and metrics["draft_tokens"] > 0
    assert 0 <= metrics["accepted_tokens"] <= metrics["draft_tokens"]
    assert record["answer"] == own["answer"]


def test_a_draft_member_is_borrowed_through_the_cache(exported, fleet_store, tmp_path: Path) -> None:
    """The 1.5B names the 0.5B as its draft: while the 0.5B is not loaded the 1.5B answers with prompt lookup
    (and the 0.5B is not loaded for it: prefetch is off); once a request has loaded it, the 1.5B drafts with
    it. Both answers are the 1.5B's greedy answer."""
    coder = {"model": "qwen2.5-coder-0.5b", "description": "Small code questions and arithmetic.", "max_tokens": 48}
    big = {"model": LARGER, "description": "Hard code questions.", "max_tokens": 48,
           "draft": "qwen2.5-coder-0.5b", "draft_tokens": "adaptive"}
    calm = _calm(tmp_path / "draft", fleet_store, [coder, big], {"enabled": False})
    try:
        before = calm.answer({"id": "b", "query": QUESTION, "model": LARGER})
        calm.answer({"id": "c", "query": "What is 2 + 2?", "model": "qwen2.5-coder-0.5b"})
        after = calm.answer({"id": "a", "query": QUESTION, "model": LARGER})
        state = calm.cache.state()
    finally:
        calm.close()
    assert before["metrics"]["draft"] == "prompt-lookup"
    assert after["metrics"]["draft"] == "qwen2.5-coder-0.5b" and after["metrics"]["accepted_tokens"] > 0
    assert after["answer"] == before["answer"]
    assert all(m["in_use"] == 0 for m in state["loaded"])  # the lent lease came back
