"""On the real fleet, with nothing learned yet: code and arithmetic go to the coder, small talk to the chat
model, and entity facts to Gemma — by semantic fit alone, through the real encoder and the default policy."""

from __future__ import annotations


import pytest
from click.testing import CliRunner

from calm_cli import policy
from calm_cli.cli import main
from calm_cli.knowledge import KnowledgeBase
from calm_cli.orchestrator import Calm

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
    kb = KnowledgeBase(tmp_path_factory.mktemp("kb") / "knowledge.sqlite")  # nothing learned yet
    return Calm(policy.load(), fleet_store, kb)


@pytest.mark.parametrize("expected,query", [(m, q) for m, qs in CASES.items() for q in qs])
def test_queries_go_to_the_fitting_member(calm: Calm, expected: str, query: str) -> None:
    decision = calm.plan(calm.encoder.embed([query])[0])
    assert decision.model == expected, [(c.model, round(c.score, 3), round(c.semantic, 3))
                                        for c in decision.candidates]


def test_a_routed_answer_is_right_and_explained(calm: Calm) -> None:
    record = calm.answer({"id": "q1", "query": "What is 7 times 8?"})
    assert record["error"] is None and record["model"] == "qwen2.5-coder-0.5b"
    assert "56" in record["answer"]
    assert record["routing"]["candidates"][0]["model"] == "qwen2.5-coder-0.5b"
    assert record["metrics"]["provider"] == "CPUExecutionProvider" and record["metrics"]["energy_estimated"]
