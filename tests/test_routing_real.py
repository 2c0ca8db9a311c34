"""On the real fleet, with nothing learned yet: code and arithmetic go to the coder, small talk to the chat
model, and entity facts to Gemma — by semantic fit alone, through the real encoder and the default policy."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from calm_cli import policy
from calm_cli.cli import main
from calm_cli.engine.embed import Encoder
from calm_cli.knowledge import open_knowledge
from calm_cli.loop.assemble import assemble
from calm_cli.loop.calm import Calm
from conftest import expected_provider

pytestmark = pytest.mark.fleet

CASES = {
    "qwen2.5-coder-0.5b": ["Write a Python function that merges two sorted lists.",
                           "What is 48 times 12?", "Fix this bug: for i in range(len(xs)) print(xs[i])",
                           "How do I read a CSV file in pandas?", "Compute 15% of 240."],
    "smollm2-135m": ["Hey there, how is your day going?", "Can you tell me something funny?",
                     "I feel a bit bored, any ideas for the evening?", "Good morning! Nice to meet you."],
    "gemma3-270m": ["Who was the first person to walk on the Moon?", "In which country is Lake Titicaca?"],
}


@pytest.fixture(scope="module")
def calm(fleet_store, tmp_path_factory) -> Calm:
    for name in ("minilm-l6", "smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"):
        result = CliRunner().invoke(main, ["models", "export", name])
        assert result.exit_code == 0, result.output
    kb = open_knowledge(tmp_path_factory.mktemp("kb") / "knowledge.sqlite")  # nothing learned yet
    return assemble(policy.load(), fleet_store, kb)


@pytest.mark.parametrize("expected,query", [(m, q) for m, qs in CASES.items() for q in qs])
def test_queries_go_to_the_fitting_member(calm: Calm, expected: str, query: str) -> None:
    decision = calm.plan(calm.embed([query])[0])
    assert decision.model == expected, [(c.model, round(c.score, 3), round(c.semantic, 3))
                                        for c in decision.candidates]


def test_a_routed_answer_is_right_and_explained(calm: Calm) -> None:
    record = calm.answer({"id": "q1", "query": "What is 7 times 8?"})
    assert record["error"] is None and record["model"] == "qwen2.5-coder-0.5b"
    assert "56" in record["answer"]
    assert record["routing"]["candidates"][0]["model"] == "qwen2.5-coder-0.5b"
    provider = record["metrics"]["provider"]
    assert provider == expected_provider()
    assert record["metrics"]["energy_estimated"] == (provider != "CUDAExecutionProvider")


def _learned_calm(tmp_path, store, escalation: dict) -> tuple[Calm, list[str]]:
    """SmolLM2 alone in the fleet, Gemma-3 as the larger member, and calibration that says Gemma is right
    where SmolLM2 is wrong on queries like the ones asked (embedded by the real encoder)."""
    import yaml

    from calm_cli.resources import POLICIES

    data = yaml.safe_load((POLICIES / "default.yaml").read_text())
    data["fleet"] = [dict(data["fleet"][0], max_tokens=8)]
    data["escalation"] = {"enabled": True, "model": "gemma3-270m", "description": "Facts about named entities.",
                          "confidence_threshold": 0.0, "max_tokens": 8, **escalation}
    tmp_path.mkdir()
    path = tmp_path / "learned.yaml"
    path.write_text(yaml.safe_dump(data))
    queries = ["Who wrote the novel Moby-Dick?", "Which river flows through Vienna?",
               "Who discovered penicillin?", "What is the capital city of Peru?"]
    vectors = Encoder(store.exports("minilm-l6")["int8"]).embed(queries)
    kb = open_knowledge(tmp_path / "kb.sqlite")
    kb.add_calibration([
        {"model": model, "task": "facts", "item_id": str(i), "score": score, "confidence": 0.9,
         "embedding": vectors[i]}
        for i in range(len(queries)) for model, score in (("smollm2-135m", 0.0), ("gemma3-270m", 1.0))])
    return assemble(policy.load(path), store, kb), queries


def test_learned_direct_route_and_escalation_reach_the_record(calm: Calm, fleet_store, tmp_path) -> None:
    """`calm` only makes sure the members are exported; each half builds its own loop."""
    direct, queries = _learned_calm(tmp_path / "direct", fleet_store, {"min_gain": 0.2, "direct_gain": 0.5})
    record = direct.answer({"id": "d1", "query": queries[0]})
    assert record["error"] is None and record["model"] == "gemma3-270m"
    assert record["routing"]["reason"].startswith("straight to gemma3-270m: expected quality")
    first = record["routing"]["candidates"][0]
    assert first["model"] == "gemma3-270m" and first["score"] is None and first["quality"] > 0.9

    escalating, _ = _learned_calm(tmp_path / "escalate", fleet_store, {"min_gain": 0.2})
    record = escalating.answer({"id": "e1", "query": queries[1]})
    assert record["model"] == "gemma3-270m" and record["routing"]["escalated_from"] == "smollm2-135m"
    assert "escalated to gemma3-270m: expected quality" in record["routing"]["reason"]
