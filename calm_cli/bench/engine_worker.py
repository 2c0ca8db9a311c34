"""One engine-benchmark measurement in a fresh process, so that load time and peak memory are its own.

Systems: calm (this engine on the exported ONNX), llama.cpp (llama-cpp-python on the same GGUF), optimum
(ORTModelForCausalLM on calm's fp32 export) and transformers (PyTorch on the GGUF, dequantized). Every system
gets the same prompt token ids and generates exactly `--tokens` tokens greedily (end of sequence ignored),
so decode rates compare like with like. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

RunFn = Callable[[list[int], int], tuple[float, float]]  # -> (ttft_s, total_s)


def _calm(export_dir: Path, threads: int) -> tuple[RunFn, str]:
    from calm_cli.engine.generate import Decoder

    decoder = Decoder(export_dir)

    def run(ids: list[int], n: int) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for _ in decoder.generate(ids, n, stop_at_eos=False):
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - start

    return run, decoder.provider


def _llama_cpp(gguf: Path, threads: int) -> tuple[RunFn, str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(ids: list[int], n: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first = None
        for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
            first = first or time.perf_counter()
            if i + 1 >= n:
                break
        return first - start, time.perf_counter() - start

    return run, "llama.cpp CPU"


def _hf_generate(model, torch) -> RunFn:
    def run(ids: list[int], n: int) -> tuple[float, float]:
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        start = time.perf_counter()
        model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=1, min_new_tokens=1)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        return ttft, time.perf_counter() - start

    return run


def _optimum(export_dir: Path, threads: int) -> tuple[RunFn, str]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(str(export_dir), provider="CPUExecutionProvider",
                                                session_options=options, use_cache=True)
    return _hf_generate(model, torch), "optimum ORT CPU"


def _transformers(gguf: Path, threads: int) -> tuple[RunFn, str]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return _hf_generate(model, torch), "PyTorch CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", required=True, choices=["calm", "llama.cpp", "optimum", "transformers"])
    parser.add_argument("--path", type=Path, required=True, help="export directory or GGUF file")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report_to, sys.stdout = sys.stdout, sys.stderr
    ids = [int(t) for t in args.prompt_ids.split(",")]
    start = time.perf_counter()
    build = {"calm": _calm, "llama.cpp": _llama_cpp, "optimum": _optimum, "transformers": _transformers}
    run, provider = build[args.system](args.path, args.threads)
    load_s = time.perf_counter() - start
    run(ids, 4)  # warm-up: first-call allocations are not the steady state
    ttfts, rates = [], []
    for _ in range(args.repeats):
        ttft, total = run(ids, args.tokens)
        ttfts.append(ttft)
        rates.append((args.tokens - 1) / (total - ttft))
    print(json.dumps({
        "system": args.system, "provider": provider, "threads": args.threads, "load_s": round(load_s, 3),
        "ttft_ms": round(statistics.median(ttfts) * 1000, 1), "decode_tok_s": round(statistics.median(rates), 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "prompt_tokens": len(ids), "new_tokens": args.tokens,
    }), file=report_to, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
