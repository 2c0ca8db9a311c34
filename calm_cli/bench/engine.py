"""`calm bench engine`: calm's engine against llama.cpp, Optimum and transformers, side by side in one run.

Each measurement runs in its own process (engine_worker.py); ratios are against llama.cpp on the same prompt at
the same thread count and at its best thread count, and (for calm) against Optimum's ORTModel on the same export at the
same thread count, with the ceiling on that last ratio that the shared weight-product kernels set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from calm_cli.engine.prompt import render
from calm_cli.engine.tokenizer import load_tokenizer
from calm_cli.errors import CalmError
from calm_cli.fleet.lock import ModelSpec
from calm_cli.fleet.store import Store

PROMPTS = {
    "prose": ("Explain in a few sentences why the sky is blue, and then give one everyday example of the same "
              "effect that a child could notice."),
    # A HumanEval-style request: code answers repeat their prompt's names, where prompt-lookup drafts pay.
    "code": ("Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
             "```python\nfrom typing import List\n\n\ndef running_average(values: List[float], window: int) -> "
             "List[float]:\n    \"\"\"Return the average of each window of `window` consecutive values in "
             "`values`.\n    >>> running_average([1.0, 2.0, 3.0, 4.0], 2)\n    [1.5, 2.5, 3.5]\n    \"\"\"\n```"),
}
SYSTEMS = ("calm", "calm+draft", "llama.cpp", "optimum", "transformers")


class BenchError(CalmError):
    """A measurement that could not be taken."""


def measure(system: str, path: Path, ids: list[int], tokens: int, threads: int, repeats: int,
            draft: str = "prompt-lookup", k: str = "4") -> dict:
    cmd = [sys.executable, "-m", "calm_cli.bench.engine_worker", "--system", system, "--path", str(path),
           "--prompt-ids", ",".join(map(str, ids)), "--tokens", str(tokens), "--threads", str(threads),
           "--repeats", str(repeats), "--draft", draft, "--k", k]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CALM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise BenchError(f"{system} on {path.name}: exit {result.returncode}: "
                         + "\n".join(result.stderr.strip().splitlines()[-5:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(specs: list[ModelSpec], store: Store, systems: list[str], precisions: list[str], threads: list[int],
        tokens: int, repeats: int, log: Callable[[str], None], prompts: tuple[str, ...] = ("prose",),
        drafts: dict[str, str] | None = None, k: str = "4") -> list[dict]:
    """One row per model, prompt, thread count, system and precision. `drafts`: each model's draft for
    calm+draft (a fleet model's name, or prompt-lookup, the default)."""
    rows = []
    for spec in specs:
        exports = store.exports(spec.name)
        gguf = store.source_dir(spec.name) / "model.gguf"
        any_export = next(iter(exports.values()), None)
        if any_export is None:
            log(f"{spec.name}: no export, skipped (run `calm models export {spec.name}`)")
            continue
        draft = (drafts or {}).get(spec.name, "prompt-lookup")
        for prompt in prompts:
            ids = load_tokenizer(any_export).encode(render(spec.prompt, PROMPTS[prompt]))
            for t in threads:
                for system in systems:
                    # Optimum's ORTModel runs Optimum's graph (model.onnx) of the same export: int4 included.
                    targets = ([(p, exports[p]) for p in precisions if p in exports]
                               if system in ("calm", "calm+draft", "optimum")
                               else [("gguf", gguf)] if system in ("llama.cpp", "transformers") else [])
                    for precision, path in targets:
                        log(f"{spec.name}: {system} {precision}, {prompt} prompt, {t} thread(s) ...")
                        try:
                            draft_path = draft if draft == "prompt-lookup" else str(store.exports(draft)[precision])
                            row = measure(system, path, ids, tokens, t, repeats, draft_path, k)
                        except (BenchError, KeyError) as exc:
                            log(f"  failed: {exc}")
                            continue
                        rows.append({"model": spec.name, "prompt": prompt, "precision": precision, **row})
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    ref = {(r["model"], r["prompt"], r["threads"]): r["decode_tok_s"] for r in rows if r["system"] == "llama.cpp"}
    opt = {(r["model"], r["prompt"], r["precision"], r["threads"]): r["decode_tok_s"]
           for r in rows if r["system"] == "optimum"}
    best_ref: dict[tuple[str, str], float] = {}
    for (model, prompt, _), rate in ref.items():
        best_ref[model, prompt] = max(best_ref.get((model, prompt), 0.0), rate)
    for r in rows:
        same = ref.get((r["model"], r["prompt"], r["threads"]))
        best = best_ref.get((r["model"], r["prompt"]))
        r["vs_llama_cpp"] = round(r["decode_tok_s"] / same, 2) if same else None
        r["vs_llama_cpp_best"] = round(r["decode_tok_s"] / best, 2) if best else None
        optimum = opt.get((r["model"], r["prompt"], r["precision"], r["threads"]))
        r["vs_optimum"] = round(r["decode_tok_s"] / optimum, 2) if optimum and r["system"] == "calm" else None
        # What calm would reach against Optimum if nothing but its weight products took time (the same
        # weights through the same kernels in both): its ratio over the products' share of its step.
        share = r.get("products_share")
        r["vs_optimum_ceiling"] = (round(r["decode_tok_s"] / optimum / share, 2)
                                   if optimum and share and r["system"] == "calm" else None)
