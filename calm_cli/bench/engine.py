"""`calm bench engine`: calm's engine against llama.cpp, Optimum and transformers, side by side in one run.

Each measurement runs in its own process (engine_worker.py); ratios are against llama.cpp at the same
thread count and at its best thread count, and (for calm) against Optimum's ORTModel on the same export at the
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

PROMPT = ("Explain in a few sentences why the sky is blue, and then give one everyday example of the same "
          "effect that a child could notice.")


class BenchError(CalmError):
    """A measurement that could not be taken."""


def measure(system: str, path: Path, ids: list[int], tokens: int, threads: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "calm_cli.bench.engine_worker", "--system", system, "--path", str(path),
           "--prompt-ids", ",".join(map(str, ids)), "--tokens", str(tokens), "--threads", str(threads),
           "--repeats", str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CALM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise BenchError(f"{system} on {path.name}: exit {result.returncode}: "
                         + "\n".join(result.stderr.strip().splitlines()[-5:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(specs: list[ModelSpec], store: Store, systems: list[str], precisions: list[str], threads: list[int],
        tokens: int, repeats: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for spec in specs:
        exports = store.exports(spec.name)
        gguf = store.source_dir(spec.name) / "model.gguf"
        any_export = next(iter(exports.values()), None)
        if any_export is None:
            log(f"{spec.name}: no export, skipped (run `calm models export {spec.name}`)")
            continue
        ids = load_tokenizer(any_export).encode(render(spec.prompt, PROMPT))
        for t in threads:
            for system in systems:
                # Optimum's ORTModel runs Optimum's graph (model.onnx) of the same export: int4 weights included.
                targets = ([(p, exports[p]) for p in precisions if p in exports] if system in ("calm", "optimum")
                           else [("gguf", gguf)] if system in ("llama.cpp", "transformers") else [])
                for precision, path in targets:
                    log(f"{spec.name}: {system} {precision}, {t} thread(s) ...")
                    try:
                        row = measure(system, path, ids, tokens, t, repeats)
                    except BenchError as exc:
                        log(f"  failed: {exc}")
                        continue
                    rows.append({"model": spec.name, "precision": precision, **row})
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    ref = {(r["model"], r["threads"]): r["decode_tok_s"] for r in rows if r["system"] == "llama.cpp"}
    opt = {(r["model"], r["precision"], r["threads"]): r["decode_tok_s"] for r in rows if r["system"] == "optimum"}
    best_ref = {}
    for (model, _), rate in ref.items():
        best_ref[model] = max(best_ref.get(model, 0.0), rate)
    for r in rows:
        same = ref.get((r["model"], r["threads"]))
        r["vs_llama_cpp"] = round(r["decode_tok_s"] / same, 2) if same else None
        r["vs_llama_cpp_best"] = round(r["decode_tok_s"] / best_ref[r["model"]], 2) if r["model"] in best_ref else None
        optimum = opt.get((r["model"], r["precision"], r["threads"]))
        r["vs_optimum"] = round(r["decode_tok_s"] / optimum, 2) if optimum and r["system"] == "calm" else None
        # What calm would reach against Optimum if nothing but its weight products took time (the same
        # weights through the same kernels in both): its ratio over the products' share of its step.
        share = r.get("products_share")
        r["vs_optimum_ceiling"] = (round(r["decode_tok_s"] / optimum / share, 2)
                                   if optimum and share and r["system"] == "calm" else None)
