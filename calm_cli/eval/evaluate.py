"""Scoring one model's answers to the workload's items (calm_cli.eval.tasks): multiple choice, short answers, code.

- Multiple choice: the log-likelihood of each option's text as the continuation of the rendered prompt
  (the question with its lettered options, then "Answer:"); rule "mean" (per token, the default) or "sum".
  Summed log-likelihood penalises long options: measured on the fleet, length-normalised scoring moved
  SmolLM2 from 27% to 67% on code_line_description. Confidence is the softmax over the options' scores,
  read at the chosen option.
- Short answers: greedy generation of a few tokens; the first non-empty line is normalised (lowercase, no
  punctuation, no articles, single spaces) and must equal a target, or be an echo of the end of the
  question followed by a target ("The genre of X is comedy"). Arithmetic compares numbers instead: the first
  number after the last "=" of that line if it has one, else its first number.
- Code (HumanEval): the model writes the function (chat models: a ```python block, whole function or body;
  base models: the body, continuing the prompt). prompt + solution runs in a sandboxed worker that answers
  calls to the entry point; the test's check() runs in a separate sandboxed checker the solution cannot
  reach (calm_cli.eval.sandbox.run_check). pass@1 with greedy decoding.
- A remote member (an OpenAI-compatible server) gives no log-likelihood of a given text, so it is scored on
  the answer it generates, greedy, through its chat endpoint: multiple choice by the option its answer names
  (rule "generated", asked to answer with the letter), short answers and code as above.
"""

from __future__ import annotations

import ast
import functools
import math
import re
import textwrap
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from calm_cli.engine.prompt import render, stop_strings
from calm_cli.engine.sampling import Sampling, log_softmax
from calm_cli.fleet.lock import ModelSpec
from calm_cli.eval.sandbox import run_check
from calm_cli.eval.tasks import LETTERS, Item
from calm_cli.members.base import Ask, Member, Run

if TYPE_CHECKING:
    from calm_cli.engine.complete import Completion
    from calm_cli.engine.decoder import Decoder

RULES = ("mean", "sum")
DEFAULT_RULE = "mean"
GENERATED_RULE = "generated"  # multiple choice answered in words (a remote member), graded by match_choice
MC_INSTRUCTION = "Answer with the letter of the right option."
CODE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Outcome:
    score: float  # 0..1 (1.0 right, 0.0 wrong)
    correct: bool
    answer: str  # the chosen option, the extracted short answer, or the code that ran
    kind: str  # "mc" | "gen" | "code"
    latency_ms: float  # MC: the scoring pass; otherwise the generation (sandbox time not included)
    energy_j: float
    energy_estimated: bool
    tokens_out: int  # 0 for MC (nothing is generated)
    confidence: float  # MC: softmax probability of the chosen option; otherwise the answer's mean token prob
    rule: str | None = None  # MC: "mean" or "sum" (log-likelihood), or "generated" (the letter it answered)
    tokens_in: int = 0
    detail: str = ""  # code: sandbox status and stderr tail; MC: the options' scores
    provider: str = ""  # what ran it: onnxruntime's execution provider, or remote:<url>


# ----------------------------------------------------------------------------------------------------------
# Normalisation and matching

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (Unicode category P) and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def first_number(text: str) -> float | None:
    """The answer's number: the first after the last '=' if there is one ("16 + 81 = 97"), else the first."""
    match = _NUMBER.search(text.rsplit("=", 1)[1]) if "=" in text else None
    match = match or _NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


def numeric_match(answer: str, targets: tuple[str, ...] | list[str]) -> bool:
    got = first_number(first_line(answer))
    if got is None:
        return False
    for target in targets:
        want = first_number(target)
        if want is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=1e-9):
            return True
    return False


def exact_match(answer: str, targets: tuple[str, ...] | list[str], question: str = "") -> bool:
    """Normalised equality with a target, allowing an echo of the end of the question before it."""
    got = normalize(first_line(answer))
    if not got:
        return False
    asked = normalize(question)
    for target in targets:
        want = normalize(target)
        if not want:
            continue
        if got == want:
            return True
        if asked and got.endswith(" " + want) and asked.endswith(got[: -len(want) - 1]):
            return True
    return False


def match_choice(answer: str, choices: tuple[str, ...]) -> int | None:
    """The option a generated MC answer names: a letter ("B", "B.", "(B) ..."), or the option's text."""
    line = first_line(answer)
    m = re.match(r"^\(?([A-Z])(?:[).:](?:\s|$)|$)", line) \
        or re.match(r"^(?:the )?(?:answer|option)(?: is)?\s*:?\s*\(?([A-Za-z])\b(?![\w'])", line, re.I)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return LETTERS.index(m.group(1).upper())
    got = normalize(line)
    exact = [i for i, c in enumerate(choices) if normalize(c) == got]
    if len(exact) == 1:
        return exact[0]
    inside = [i for i, c in enumerate(choices) if normalize(c) and normalize(c) in got]
    return inside[0] if len(inside) == 1 else None


# ----------------------------------------------------------------------------------------------------------
# Prompts


def _chat(spec: ModelSpec) -> bool:
    return spec.prompt["kind"] == "chat"


def mc_prompt(spec: ModelSpec, item: Item) -> str:
    """The text whose continuation is scored: chat models get "Answer:" at the end of the user turn and the
    option follows the assistant header; few-shot templates end in "Answer:" already."""
    return render(spec.prompt, f"{item.query}\nAnswer:" if _chat(spec) else item.query)


def continuation(prompt: str, option: str) -> str:
    return option if not prompt or prompt[-1].isspace() else " " + option


def generation_prompt(spec: ModelSpec, item: Item) -> tuple[str, list[str]]:
    """(model input, stop strings) for a generated answer to `item`."""
    if item.kind == "code":
        if _chat(spec):
            return render(spec.prompt, item.query), []
        # A base model continues the prompt with the body; stop where the function ends.
        return item.prompt, ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#", "\n```"]
    # Only the first line of a short answer is graded: stop there.
    return render(spec.prompt, item.query), [*stop_strings(spec.prompt), "\n"]


# ----------------------------------------------------------------------------------------------------------
# Multiple choice


def option_logprobs(decoder: Decoder, context: list[int], continuations: list[list[int]]) -> list[list[float]]:
    """Per-token log-probabilities of each continuation after `context`, the context run only once.

    An engine Decoder runs the context once and branches its past (engine.decode.forward); any other scorer
    is asked for `score(context, continuation)` per option.
    """
    from calm_cli.engine.decode import forward
    from calm_cli.engine.decoder import Decoder, PromptTooLong
    from calm_cli.engine.kv import empty_past

    if not isinstance(decoder, Decoder):
        return [decoder.score(context, c) for c in continuations]

    longest = max(len(c) for c in continuations)
    if len(context) + longest > decoder.context:
        raise PromptTooLong(f"{len(context) + longest} tokens exceed the context window of {decoder.context} tokens")
    n = len(context)
    ones = np.ones((1, n), dtype=np.int64)
    logits, past = forward(decoder, np.asarray([context], dtype=np.int64), ones,
                           np.arange(n, dtype=np.int64)[None, :], empty_past(decoder, 1))
    first = log_softmax(logits[0, -1])
    out = []
    for cont in continuations:
        values = [float(first[cont[0]])]
        if len(cont) > 1:
            step = cont[:-1]
            total = n + len(step)
            more, _ = forward(decoder, np.asarray([step], dtype=np.int64), np.ones((1, total), dtype=np.int64),
                              np.arange(n, total, dtype=np.int64)[None, :], past)
            logp = log_softmax(more[0])
            values += [float(logp[i, t]) for i, t in enumerate(cont[1:])]
        out.append(values)
    return out


def _softmax(values: list[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def score_mc(decoder: Decoder, spec: ModelSpec, item: Item, rule: str = DEFAULT_RULE) -> Outcome:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not item.choices:
        raise ValueError(f"{item.item_id}: a multiple-choice item without choices")
    prompt = mc_prompt(spec, item)
    decoder.meter.start()
    started = time.perf_counter()
    context = decoder.encode(prompt)
    conts = [decoder.tokenizer.encode(continuation(prompt, c), add_special=False) for c in item.choices]
    per_token = option_logprobs(decoder, context, conts)
    scores = [float(np.mean(lp)) if rule == "mean" else float(np.sum(lp)) for lp in per_token]
    latency_ms = (time.perf_counter() - started) * 1000
    reading = decoder.meter.read()
    chosen = int(np.argmax(scores))
    correct = chosen == item.answer_index
    detail = " ".join(f"{LETTERS[i]}={s:.3f}" for i, s in enumerate(scores))
    return Outcome(score=float(correct), correct=correct, answer=item.choices[chosen], kind="mc",
                   latency_ms=latency_ms, energy_j=reading.energy_j, energy_estimated=reading.energy_estimated,
                   tokens_out=0, confidence=float(_softmax(scores)[chosen]), rule=rule,
                   tokens_in=len(context) + sum(map(len, conts)), detail=detail, provider=decoder.provider)


# ----------------------------------------------------------------------------------------------------------
# Code


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
         ast.AnnAssign)


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.M) is not None


def extract_code(text: str, entry_point: str) -> tuple[str, bool]:
    """(code, whole_function) from a model's answer: the fenced block that defines `entry_point` (else the
    first block, else the whole text); whole_function says whether it defines the function or is a body."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]
    code = next((b for b in blocks if _defines(b, entry_point)), blocks[0] if blocks else text)
    return code.rstrip() + "\n", _defines(code, entry_point)


def sanitize(code: str) -> str:
    """Top-level imports, definitions and assignments only: drop the model's own example calls, prints,
    asserts and `if __name__ == "__main__"` blocks. Code that does not parse is returned as it is."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    kept = [node for node in tree.body if isinstance(node, _KEEP)]
    return ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n"


def humaneval_program(item: Item, completion: str, whole_function: bool) -> str:
    """The candidate module: prompt + solution (never the test, which only the checker sees)."""
    if whole_function:
        return item.prompt + "\n\n" + sanitize(completion)
    body = completion if completion.strip() and completion.lstrip("\n")[:1] in (" ", "\t") \
        else textwrap.indent(completion, "    ")
    return item.prompt + body


def run_humaneval(item: Item, completion: str, whole_function: bool,
                  timeout_s: float | None = None) -> tuple[bool, str]:
    """(passed, detail) for a solution. Passed means the test's check() returned in the checker, calling the
    solution in its own sandbox: nothing the solution prints, exits with or reads can make it pass."""
    result = run_check(humaneval_program(item, completion, whole_function), item.entry_point, item.test,
                       context=item.prompt, timeout_s=CODE_TIMEOUT_S if timeout_s is None else timeout_s)
    weaker = " [sandbox: audit hooks only]" if result.level == "audit-hooks" else ""
    if result.passed:
        return True, "passed" + weaker
    output = f" | output: {result.output_tail[-300:]}" if result.output_tail else ""
    return False, f"{result.status}: {result.reason}"[:600] + output + weaker


# ----------------------------------------------------------------------------------------------------------
# Grading a generated answer, and evaluating an item end to end


def grade(item: Item, text: str) -> tuple[float, bool, str, str]:
    """(score, correct, extracted answer, detail) for a generated answer to any item: useful where the
    answer came from elsewhere (a routed request). Code runs in the sandbox."""
    if item.kind == "mc":
        index = match_choice(text, item.choices)
        correct = index == item.answer_index
        return float(correct), correct, item.choices[index] if index is not None else first_line(text), ""
    if item.kind == "gen":
        correct = numeric_match(text, item.targets) if item.numeric else exact_match(text, item.targets, item.query)
        return float(correct), correct, first_line(text), ""
    if item.kind == "code":
        code, whole = extract_code(text, item.entry_point)
        passed, detail = run_humaneval(item, code, whole)
        return float(passed), passed, code, detail
    raise ValueError(f"{item.item_id}: unknown kind {item.kind!r}")


def generate_answer(decoder: Decoder, spec: ModelSpec, item: Item, max_new_tokens: int | None = None) -> Completion:
    """The model's greedy Completion for `item` (short answers and code)."""
    from calm_cli.engine.complete import complete

    prompt, stops = generation_prompt(spec, item)
    return complete(decoder, prompt, max_new_tokens or item.max_new_tokens, Sampling(), stop=stops)


def item_ask(item: Item) -> Ask:
    """`item` as a question for a member that only answers questions (a remote server): multiple choice asks
    for the option's letter, since no log-likelihood of given text comes back."""
    query = f"{item.query}\n\n{MC_INSTRUCTION}" if item.kind == "mc" else item.query
    return Ask(query, item.max_new_tokens)


def evaluate_run(item: Item, run: Run) -> Outcome:
    """The Outcome of a member's generated answer to `item` (multiple choice by the option it names)."""
    score, correct, answer, detail = grade(item, run.text)
    return Outcome(score=score, correct=correct, answer=answer, kind=item.kind, latency_ms=run.latency_ms,
                   energy_j=run.energy_j, energy_estimated=run.energy_estimated, tokens_out=run.tokens_out,
                   confidence=run.confidence, rule=GENERATED_RULE if item.kind == "mc" else None,
                   tokens_in=run.tokens_in, detail=detail, provider=run.provider)


def evaluate_member(member: Member, session: object, item: Item, rule: str = DEFAULT_RULE) -> Outcome:
    """Score any fleet member on one item, on a session it loaded: a local export as evaluate_item does; a
    remote member on the answer its server generates (rule "generated" for multiple choice)."""
    if member.remote:
        return evaluate_run(item, member.generate(session, item_ask(item)))
    return evaluate_item(session, _specs()[member.name], item, rule)  # type: ignore[arg-type]


@functools.cache
def _specs() -> dict[str, ModelSpec]:
    """models.lock, read once: a member may be wrapped (a benchmark's Slowed), so its spec is looked up by name."""
    from calm_cli.fleet import lock

    return lock.load()


def evaluate_item(decoder: Decoder, spec: ModelSpec, item: Item, rule: str = DEFAULT_RULE) -> Outcome:
    """Score `decoder` (a calm_cli.engine.decoder.Decoder of the model `spec`) on one item."""
    if item.kind == "mc":
        return score_mc(decoder, spec, item, rule)
    completion = generate_answer(decoder, spec, item)
    text = completion.text
    if item.kind == "code" and not _chat(spec):  # a base model continued the prompt: the text is the body
        passed, detail = run_humaneval(item, text, whole_function=False)
        score, correct, answer = float(passed), passed, text
    else:
        score, correct, answer, detail = grade(item, text)
    return Outcome(score=score, correct=correct, answer=answer, kind=item.kind, latency_ms=completion.latency_ms,
                   energy_j=completion.energy_j, energy_estimated=completion.energy_estimated,
                   tokens_out=completion.tokens_out, confidence=completion.confidence, rule=None,
                   tokens_in=completion.tokens_in, detail=detail, provider=decoder.provider)
