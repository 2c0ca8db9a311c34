"""Measure what the export keeps: fp32 ONNX vs transformers, int4 vs fp32, int4 and llama.cpp vs fp32, per model.

Run in calm's environment with the [export] extra and llama-cpp-python installed, after
`calm models export NAME --precision fp32` and `--precision int4`:

    python scripts/export_quality.py [--models smollm2-135m,...] [--tokens 32] [--json out.json]

It prints a markdown table (docs/EXPORT.md, "Export quality", holds the last one) and, with --json, the raw figures.
All models read the same token ids: the prompt is tokenized once with calm's GGUF-built tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from calm_cli import settings
from calm_cli.engine import decode
from calm_cli.engine.decoder import Decoder
from calm_cli.engine.prompt import render
from calm_cli.fleet import lock
from calm_cli.fleet.store import Store

# (question, substring a right answer contains; None where any answer will do)
PROMPTS: list[tuple[str, str | None]] = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is 12 + 30?", "42"),
    ("What is 7 times 8?", "56"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("How many days are in a week?", "7"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Write a Python function that returns the factorial of n.", "def"),
    ("Write a Python function that reverses a string.", "def"),
    ("What does HTTP stand for?", "Hypertext"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("Name a primary colour.", None),
    ("Explain in one sentence what a CPU does.", None),
    ("Translate 'good morning' into Spanish.", "Buenos"),
    ("What is the square root of 81?", "9"),
    ("Give a synonym for 'happy'.", None),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("Write a haiku about autumn.", None),
]


def greedy_ids(decoder: Decoder, ids: list[int], n: int) -> list[int]:
    return list(decode.greedy(decoder, ids, n))


def teacher_forced_agreement(a: Decoder, b: Decoder, sequences: list[tuple[list[int], int]]) -> float:
    """Share of positions (the continuations only) where both pick the same next token."""
    same = total = 0
    for ids, start in sequences:
        la, lb = decode.logits(a, ids)[start - 1:-1], decode.logits(b, ids)[start - 1:-1]
        same += int((la.argmax(-1) == lb.argmax(-1)).sum())
        total += len(la)
    return same / max(total, 1)


def common_prefix(x: list[int], y: list[int]) -> int:
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def transformers_greedy(gguf: Path, prompts: list[list[int]], n: int, stops: set[int]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                 eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0])[0, len(ids):].tolist()
            cut = next((i for i, t in enumerate(gen) if t in stops), len(gen))
            out.append(gen[:cut])
    return out


def llama_cpp_runs(gguf: Path, prompts: list[list[int]], n: int, stops: set[int],
                   forced: list[tuple[list[int], int]]) -> tuple[list[list[int]], list[np.ndarray]]:
    """llama.cpp's greedy continuations, and its logits over the teacher-forced sequences."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=1, logits_all=True, verbose=False)
    gens = []
    for ids in prompts:
        llm.reset()
        gen = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in stops or len(gen) >= n:
                break
            gen.append(token)
        gens.append(gen)
    logits = []
    for ids, start in forced:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[start - 1:len(ids) - 1]))
    return gens, logits


def measure(name: str, store: Store, tokens: int, with_transformers: bool) -> dict:
    spec = lock.load()[name]
    exports = store.exports(name)
    fp32, int4 = Decoder.load(exports["fp32"]), Decoder.load(exports["int4"])
    stops = set(fp32.tokenizer.stop_ids)
    prompts = [fp32.encode(render(spec.prompt, q)) for q, _ in PROMPTS]
    g32 = [greedy_ids(fp32, p, tokens) for p in prompts]
    g4 = [greedy_ids(int4, p, tokens) for p in prompts]
    forced = [(p + g, len(p)) for p, g in zip(prompts, g32) if g]
    row: dict = {"model": name, "prompts": len(prompts), "max_new_tokens": tokens}
    row["int4_vs_fp32_top1"] = teacher_forced_agreement(int4, fp32, forced)
    row["int4_vs_fp32_identical"] = sum(a == b for a, b in zip(g4, g32))
    row["int4_vs_fp32_prefix"] = float(np.mean([common_prefix(a, b) / max(len(b), 1) for a, b in zip(g4, g32)]))
    checks = [(i, want) for i, (_, want) in enumerate(PROMPTS) if want]

    def right(gens: list[list[int]]) -> int:
        return sum(want.lower() in fp32.tokenizer.decode(gens[i], skip_special=True).lower() for i, want in checks)

    row["checked_answers"] = len(checks)
    row["right_fp32"], row["right_int4"] = right(g32), right(g4)
    if with_transformers:
        gt = transformers_greedy(store.source_dir(name) / "model.gguf", prompts, tokens, stops)
        row["fp32_vs_transformers_identical"] = sum(a == b for a, b in zip(g32, gt))
        row["fp32_vs_transformers_prefix"] = float(np.mean([common_prefix(a, b) / max(len(b), 1)
                                                            for a, b in zip(g32, gt)]))
    gl, llogits = llama_cpp_runs(store.source_dir(name) / "model.gguf", prompts, tokens, stops, forced)
    same = same_fp32 = total = 0
    for (ids, start), ll in zip(forced, llogits):
        mine, ref = decode.logits(int4, ids)[start - 1:-1], decode.logits(fp32, ids)[start - 1:-1]
        same += int((mine.argmax(-1) == ll.argmax(-1)).sum())
        same_fp32 += int((ref.argmax(-1) == ll.argmax(-1)).sum())
        total += len(ll)
    row["int4_vs_llama_cpp_top1"] = same / max(total, 1)
    # The bar for int4 vs fp32: how close llama.cpp's own arithmetic on the same GGUF comes to fp32.
    row["llama_cpp_vs_fp32_top1"] = same_fp32 / max(total, 1)
    row["int4_vs_llama_cpp_identical"] = sum(a == b for a, b in zip(g4, gl))
    row["right_llama_cpp"] = right(gl)
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | fp32 ONNX = transformers (greedy, identical / prompts) | int4 vs fp32: teacher-forced top-1 "
            "| llama.cpp vs fp32: teacher-forced top-1 "
            "| int4 vs fp32: identical greedy | int4 vs fp32: mean greedy prefix | right answers fp32 / int4 / "
            "llama.cpp | int4 vs llama.cpp: teacher-forced top-1 | int4 = llama.cpp greedy |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    body = ""
    for r in rows:
        tf = (f"{r['fp32_vs_transformers_identical']}/{r['prompts']}" if "fp32_vs_transformers_identical" in r
              else "not run")
        body += (f"| {r['model']} | {tf} | {r['int4_vs_fp32_top1']:.3f} | {r['llama_cpp_vs_fp32_top1']:.3f}"
                 f" | {r['int4_vs_fp32_identical']}/{r['prompts']}"
                 f" | {r['int4_vs_fp32_prefix']:.2f} | {r['right_fp32']} / {r['right_int4']} / {r['right_llama_cpp']}"
                 f" of {r['checked_answers']} | {r['int4_vs_llama_cpp_top1']:.3f} | "
                 f"{r['int4_vs_llama_cpp_identical']}/{r['prompts']} |\n")
    return head + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--no-transformers", default="", help="comma-separated models to skip transformers for")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    store = Store(settings.path("cache_dir"))
    skip = set(filter(None, args.no_transformers.split(",")))
    rows = []
    for name in args.models.split(","):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(measure(name, store, args.tokens, name not in skip))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
