"""Scoring answers: normalisation and matching tables, MC rules on a fake decoder, code extraction, grading
code through the HumanEval check (the sandbox itself: tests/test_sandbox.py), and a real model (SmolLM2
int4) scoring multiple-choice items with both rules."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calm_cli.eval import evaluate, tasks
from calm_cli.engine import decode
from calm_cli.engine.meters import EnergyMeter
from calm_cli.eval.evaluate import exact_match, extract_code, match_choice, normalize, numeric_match
from calm_cli.fleet import lock
from calm_cli.eval.tasks import Item

SPECS = lock.load()
CHAT = SPECS["smollm2-135m"]
FEW_SHOT = SPECS["gemma3-270m"]


# ---------------------------------------------------------------------------------------------------------
# Normalisation and matching

@pytest.mark.parametrize("text, normal", [
    ("Paris", "paris"),
    ("  The  Eiffel   Tower. ", "eiffel tower"),
    ("an apple, a pear!", "apple pear"),
    ("U.S.A.", "usa"),
    ("Theatre", "theatre"),  # 'the' only as a word
    ("«Guillemets» and ¿qué?", "guillemets and qué"),
    ("", ""),
])
def test_normalize(text: str, normal: str) -> None:
    assert normalize(text) == normal


@pytest.mark.parametrize("answer, targets, question, ok", [
    ("English", ("English",), "", True),
    ("english.", ("English",), "", True),
    (" The comedy\nmore text", ("comedy", "parody"), "", True),
    ("parody", ("comedy", "parody"), "", True),
    ("comedy and parody", ("comedy", "parody"), "", False),
    ("The genre of Weird Al is comedy.", ("comedy",), "Complete the sentence: The genre of Weird Al is ...", True),
    ("Weird Al is comedy", ("comedy",), "Complete the sentence: The genre of Weird Al is ...", True),
    ("It is comedy", ("comedy",), "Complete the sentence: The genre of Weird Al is ...", False),
    ("", ("comedy",), "", False),
    ("\n\n", ("",), "", False),
])
def test_exact_match(answer: str, targets: tuple[str, ...], question: str, ok: bool) -> None:
    assert exact_match(answer, targets, question) is ok


@pytest.mark.parametrize("answer, target, ok", [
    ("97", "97", True),
    ("The answer is 97.", "97", True),
    ("16 + 81 = 97", "97", True),  # the number after '=', not the first operand
    ("16 + 81 = 98", "97", False),
    ("-12", "-12", True),
    ("12", "-12", False),
    ("1,499", "1499", True),
    ("97.0", "97", True),
    ("9 7", "97", False),
    ("ninety-seven", "97", False),
    ("97\n16", "97", True),
    ("\n 97", "97", True),
    ("It is 16", "97", False),
    ("", "97", False),
])
def test_numeric_match(answer: str, target: str, ok: bool) -> None:
    assert numeric_match(answer, (target,)) is ok


@pytest.mark.parametrize("answer, index", [
    ("B", 1), ("B.", 1), ("(C) six", 2), ("C: six", 2), ("The answer is B", 1), ("Answer: a", 0),
    ("four", 1), ("Horses have four legs.", 1), ("A horse has four legs", 1), ("two or four", None),
    ("E", None), ("", None),
])
def test_match_choice(answer: str, index: int | None) -> None:
    assert match_choice(answer, ("two", "four", "six")) == index


# ---------------------------------------------------------------------------------------------------------
# Multiple choice on a fake decoder: one token per word, known log-probabilities


class _Tokenizer:
    def __init__(self) -> None:
        self.words: list[str] = []

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return ids


class FakeDecoder:
    """Not an engine Decoder: evaluate falls back to its `score`, one call per option."""

    LOGP = {"long": -0.5, "right": -0.5, "answer": -0.5, "here": -0.5, "no": -1.5}
    provider = "fake"  # what the Outcome names as having run it

    def __init__(self) -> None:
        self.tokenizer = _Tokenizer()
        self.meter = EnergyMeter(on_gpu=False)
        self.contexts: list[list[int]] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def score(self, context: list[int], continuation: list[int]) -> list[float]:
        self.contexts.append(context)
        return [self.LOGP.get(self.tokenizer.words[t], -5.0) for t in continuation]


MC = Item("toy", "toy/1", "science", "mc", "Which?\n\nA. no\nB. long right answer here",
          choices=("no", "long right answer here"), answer_index=1)


def test_mean_rule_is_length_normalised_and_sum_is_not() -> None:
    mean = evaluate.evaluate_item(FakeDecoder(), CHAT, MC)
    assert mean.rule == "mean" and mean.correct and mean.score == 1.0 and mean.answer == "long right answer here"
    assert mean.confidence == pytest.approx(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-1.5)))
    total = evaluate.evaluate_item(FakeDecoder(), CHAT, MC, rule="sum")
    assert total.rule == "sum" and not total.correct and total.score == 0.0 and total.answer == "no"
    assert total.confidence == pytest.approx(math.exp(-1.5) / (math.exp(-1.5) + math.exp(-2.0)))
    for outcome in (mean, total):
        assert outcome.kind == "mc" and outcome.tokens_out == 0 and outcome.latency_ms >= 0
        assert outcome.energy_estimated and outcome.energy_j >= 0
    with pytest.raises(ValueError, match="rule"):
        evaluate.evaluate_item(FakeDecoder(), CHAT, MC, rule="max")


def test_mc_prompts_ask_for_the_answer() -> None:
    chat = evaluate.mc_prompt(CHAT, MC)
    assert chat.endswith("B. long right answer here\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert evaluate.continuation(chat, "four") == "four"
    few = evaluate.mc_prompt(FEW_SHOT, MC)
    assert few.endswith("Question: Which?\n\nA. no\nB. long right answer here\nAnswer:")
    assert evaluate.continuation(few, "four") == " four"


def test_generation_prompts_stop_at_the_first_line() -> None:
    gen = Item("t", "t/1", "knowledge", "gen", "What is 2 + 2?", targets=("4",), numeric=True)
    prompt, stops = evaluate.generation_prompt(CHAT, gen)
    assert prompt.endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n") and "\n" in stops
    prompt, stops = evaluate.generation_prompt(FEW_SHOT, gen)
    assert prompt.endswith("Question: What is 2 + 2?\nAnswer:") and {"\n", "\n\n"} <= set(stops)
    code = Item("humaneval", "HumanEval/x", "code", "code", tasks.code_query(ADD.prompt), prompt=ADD.prompt,
                entry_point="add", test=ADD.test)
    prompt, stops = evaluate.generation_prompt(CHAT, code)
    assert "```python\ndef add(a, b):" in prompt and stops == []
    prompt, stops = evaluate.generation_prompt(FEW_SHOT, code)
    assert prompt == ADD.prompt and "\ndef " in stops


# ---------------------------------------------------------------------------------------------------------
# Code: extraction and HumanEval-style checks in the sandbox

ADD = Item("humaneval", "HumanEval/x", "code", "code", "", prompt='def add(a, b):\n    """Add a and b."""\n',
           entry_point="add",
           test="def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n")


@pytest.mark.parametrize("text, code, whole", [
    ("Here:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "def add(a, b):\n    return a + b\n", True),
    ("```\n    return a + b\n```", "    return a + b\n", False),
    ("```py\nimport math\n\ndef helper(x):\n    return x\n```\n```python\ndef add(a, b):\n    return a+b\n```",
     "def add(a, b):\n    return a+b\n", True),
    ("    return a + b", "    return a + b\n", False),
    ("```python\ndef add(a, b):\n    return a + b", "def add(a, b):\n    return a + b\n", True),  # unclosed fence
    ("```bash\npip x\n```\ndef add(a, b): return a + b", "```bash\npip x\n```\ndef add(a, b): return a + b\n", True),
])
def test_extract_code(text: str, code: str, whole: bool) -> None:
    assert extract_code(text, "add") == (code, whole)


def test_sanitize_keeps_definitions_only() -> None:
    code = ("import math\nLIMIT = 3\ndef add(a, b):\n    print('inside is fine')\n    return a + b\n"
            "print(add(1, 2))\nassert add(1, 1) == 3\nif __name__ == '__main__':\n    add(0, 0)\n")
    out = evaluate.sanitize(code)
    assert "import math" in out and "LIMIT = 3" in out and "inside is fine" in out
    assert "print(add" not in out and "assert add" not in out and "__main__" not in out
    assert evaluate.sanitize("def broken(:\n") == "def broken(:\n"


@pytest.mark.parametrize("answer, passed, detail", [
    ("```python\ndef add(a, b):\n    return a + b\n```", True, "passed"),
    ("```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 1))\nassert add(1, 1) == 3\n```", True, "passed"),
    ("```python\n    return a + b\n```", True, "passed"),
    ("```python\nreturn a + b\n```", True, "passed"),  # a body written without indentation
    ("```python\ndef add(a, b):\n    return a - b\n```", False, "AssertionError"),
    ("```python\ndef add(a, b):\n    return a +\n```", False, "SyntaxError"),
    ("```python\n    import sys\n    sys.exit(0)\n```", False, "the candidate exited during a call (SystemExit: 0)"),
    ("```python\n    import os\n    os._exit(0)\n```", False, "the candidate's process exited during a call"),
    ("```python\nimport os\nx = os._exit(0)\ndef add(a, b):\n    return a + b\n```", False, "exited before it was ready"),
    ("```python\n    x = bytearray(2 ** 32)\n```", False, "MemoryError"),
    ("```python\n    while True:\n        pass\n```", False, "timeout"),
])
def test_grade_code(answer: str, passed: bool, detail: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate, "CODE_TIMEOUT_S", 2.0)
    score, correct, code, why = evaluate.grade(ADD, answer)
    assert correct is passed and score == float(passed)
    assert detail in why


def test_grade_short_answers_and_generated_mc() -> None:
    gen = Item("t", "t/1", "arithmetic", "gen", "What is 16 plus 81?", targets=("97",), numeric=True)
    assert evaluate.grade(gen, "16 + 81 = 97\nso") == (1.0, True, "16 + 81 = 97", "")
    assert evaluate.grade(gen, "97?")[1] and not evaluate.grade(gen, "98")[1]
    assert evaluate.grade(MC, "B")[:3] == (1.0, True, "long right answer here")
    assert evaluate.grade(MC, "no")[:2] == (0.0, False)


def test_a_generated_answer_is_scored_as_a_remote_members_is() -> None:
    """A remote member gives no log-likelihoods: multiple choice is asked for its letter and graded on it,
    with the run's meters and provider carried into the Outcome."""
    from calm_cli.members.base import Run

    ask = evaluate.item_ask(MC)
    assert ask.query.startswith(MC.query) and ask.query.endswith(evaluate.MC_INSTRUCTION)
    assert ask.max_tokens == MC.max_new_tokens
    gen = Item("t", "t/1", "arithmetic", "gen", "What is 16 plus 81?", targets=("97",), numeric=True)
    assert evaluate.item_ask(gen).query == gen.query

    def run(text: str) -> Run:
        return Run("m-remote", text, 120.0, 30.0, 11, 3, 20.0, 1.5, True, float("nan"), "remote:http://h/v1", "eos")

    right = evaluate.evaluate_run(MC, run("B. long right answer here"))
    assert (right.score, right.correct, right.rule, right.kind) == (1.0, True, evaluate.GENERATED_RULE, "mc")
    assert (right.latency_ms, right.energy_j, right.tokens_in, right.tokens_out) == (120.0, 1.5, 11, 3)
    assert right.provider == "remote:http://h/v1" and math.isnan(right.confidence)
    assert evaluate.evaluate_run(MC, run("I am not sure")).score == 0.0
    numeric = evaluate.evaluate_run(gen, run("97"))
    assert numeric.correct and numeric.rule is None


# ---------------------------------------------------------------------------------------------------------
# Real data and a real model (the sandbox and all 164 canonical HumanEval solutions: tests/test_sandbox.py)

@pytest.fixture(scope="session")
def smollm2_int4(fleet_store):
    from calm_cli.engine.decoder import Decoder

    exports = fleet_store.exports("smollm2-135m")
    if "int4" not in exports:
        calm = Path(sys.executable).with_name("calm")
        done = subprocess.run([str(calm), "models", "export", "smollm2-135m", "--precision", "int4"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"calm models export smollm2-135m failed:\n{done.stderr[-2000:]}")
        exports = fleet_store.exports("smollm2-135m")
    return Decoder.load(exports["int4"])


@pytest.mark.fleet
def test_cached_option_scoring_equals_full_scoring(smollm2_int4, pinned_data: dict[str, Path]) -> None:
    item = tasks.load_items(["general_knowledge"], 1, seed=0, data=pinned_data)[0]
    prompt = evaluate.mc_prompt(CHAT, item)
    context = smollm2_int4.encode(prompt)
    conts = [smollm2_int4.tokenizer.encode(evaluate.continuation(prompt, c), add_special=False) for c in item.choices]
    cached = evaluate.option_logprobs(smollm2_int4, context, conts)
    full = [decode.score(smollm2_int4, context, c) for c in conts]
    assert [len(c) for c in cached] == [len(c) for c in conts]
    # The same arithmetic, but int4 products with int8 activations take another kernel path for one row than
    # for several (onnxruntime's MatMulNBits at accuracy level 4): 3.5e-3 apart on an AMD EPYC, within 2e-3
    # on the machines of earlier runs. A wrong KV reuse would be off by whole nats.
    np.testing.assert_allclose(np.concatenate(cached), np.concatenate(full), atol=1e-2)


@pytest.mark.fleet
def test_smollm2_scores_mc_items_with_both_rules(smollm2_int4, pinned_data: dict[str, Path]) -> None:
    items = tasks.load_items(["code_line_description", "physics"], 6, seed=0, data=pinned_data)
    right = {"mean": 0, "sum": 0}
    for item in items:
        for rule in ("mean", "sum"):
            outcome = evaluate.evaluate_item(smollm2_int4, CHAT, item, rule=rule)
            assert outcome.rule == rule and outcome.kind == "mc" and outcome.answer in item.choices
            assert 1 / len(item.choices) - 1e-9 <= outcome.confidence <= 1.0
            assert outcome.latency_ms > 0 and outcome.energy_j >= 0 and outcome.tokens_in > 0
            assert outcome.correct == (outcome.answer == item.choices[item.answer_index])
            right[rule] += outcome.correct
    assert right["mean"] >= 3, right  # chance is 3 of 12


@pytest.mark.fleet
def test_smollm2_answers_generation_and_code_items(smollm2_int4, pinned_data: dict[str, Path]) -> None:
    for task in ("arithmetic", "qa_wikidata", "humaneval"):
        item = tasks.load_items([task], 1, seed=0, data=pinned_data)[0]
        outcome = evaluate.evaluate_item(smollm2_int4, CHAT, item)
        assert outcome.kind == item.kind and outcome.rule is None and 0 <= outcome.confidence <= 1
        assert 0 < outcome.tokens_out <= item.max_new_tokens and outcome.latency_ms > 0
        assert outcome.score in (0.0, 1.0) and outcome.correct == (outcome.score == 1.0)
        if task == "humaneval":
            assert outcome.detail.split(":")[0] in ("passed", "failed", "timeout")
