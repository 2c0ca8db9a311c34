"""One engine-benchmark measurement in a fresh process, so that load time and peak memory are its own.

Systems: calm (this engine on the exported ONNX), calm+draft (the same with speculative decoding: prompt-lookup
drafts or a draft model's export; the row adds the acceptance rate, whether its tokens equal calm's plain greedy
decoding and, where not, the two candidates' logit gap where they part), llama.cpp (llama-cpp-python on the
same GGUF), optimum (ORTModelForCausalLM on Optimum's own graph of calm's export of the same precision) and
transformers (PyTorch on the GGUF, dequantized). Every system gets the same prompt token ids and generates
exactly `--tokens` tokens greedily (end of sequence ignored), so decode rates compare like with like. Prints one
JSON line.

For the two onnxruntime systems one more, profiled, generation (after the timed ones, so it does not slow them)
gives `products_share`: the share of onnxruntime's decode-step time spent in the weight products (MatMulNBits,
their min corrections, fp32 MatMul/Gemm). Both systems run the same weights through the same kernels, so that
time is a floor under either one's step and caps what any engine change can win over Optimum. (Optimum's plain
graph also computes attention with MatMul, which counts here too: its share is an upper bound.)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from calm_cli.fleet.graph.names import is_block_sum

if TYPE_CHECKING:  # imported for real inside the functions: llama.cpp and transformers runs never load it
    import onnxruntime as ort

RunFn = Callable[[list[int], int], tuple[float, float]]  # -> (ttft_s, total_s)
ProfileFn = Callable[[list[int], int], float]  # -> weight products' share of a decode step

PRODUCTS = {"MatMulNBits", "MatMul", "Gemm"}  # with the block sums of the min corrections (is_block_sum)


def products_share(profile: Path) -> float:
    """Share of the decode steps' run time (first run = prompt, left out) in weight-product kernels.

    Both times come from the same profiled runs, so the profiler's own per-node cost weighs on both sides.
    """
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(runs) < 2:
        raise ValueError(f"{profile}: {len(runs)} runs profiled, need the prompt and at least one decode step")
    products = sum(e["dur"] for e in events
                   if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[1][0]
                   and (e.get("args", {}).get("op_name") in PRODUCTS or is_block_sum(e["name"])))
    return products / sum(dur for _, dur in runs[1:])


def _profiled_options(threads: int | None, directory: str) -> ort.SessionOptions:
    """calm's own session options (threads None) or Optimum's (plain, `threads` intra-op), profiling on."""
    import onnxruntime as ort

    from calm_cli.engine.session import session_options

    options = session_options() if threads is None else ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(directory) / "profile")
    return options


def _calm(export_dir: Path, threads: int) -> tuple[RunFn, str, ProfileFn | None]:
    from calm_cli.engine.decode import generate
    from calm_cli.engine.decoder import Decoder

    decoder = Decoder.load(export_dir)

    def run(ids: list[int], n: int) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for _ in generate(decoder, ids, n, stop_at_eos=False):
            first = first or time.perf_counter()
        return first - start, time.perf_counter() - start

    def profile(ids: list[int], n: int) -> float:
        import onnxruntime as ort

        from calm_cli.engine.session import decoder_graph, requested_providers

        with tempfile.TemporaryDirectory() as tmp:  # after the timed runs: the same decoder on a profiled session
            profiled = replace(decoder, session=ort.InferenceSession(
                str(decoder_graph(export_dir)), _profiled_options(None, tmp), providers=requested_providers()))
            for _ in generate(profiled, ids, n, stop_at_eos=False):
                pass
            return products_share(Path(profiled.session.end_profiling()))

    return run, decoder.provider, profile


def _calm_draft(export_dir: Path, draft: str, k: str, extra: dict) -> tuple[RunFn, str, ProfileFn | None]:
    """calm with speculative decoding; `extra` receives the acceptance rate (over every timed run) and whether
    its tokens equal plain greedy decoding's (with the logit gap where they part, if they do)."""
    from calm_cli.bench.speculate import divergence
    from calm_cli.engine.decode import generate
    from calm_cli.engine.decoder import Decoder
    from calm_cli.engine.speculate import Counts, Speculation, draft_tokens, speculative_steps

    decoder = Decoder.load(export_dir)
    drafter = None if draft == "prompt-lookup" else Decoder.load(Path(draft))
    speculation = Speculation(*draft_tokens(k), model=drafter,
                              model_name=None if drafter is None else Path(draft).parent.name)
    tally = {"drafted": 0, "accepted": 0}
    extra["draft"] = "prompt-lookup" if drafter is None else Path(draft).parent.name
    extra["k"] = k

    def run(ids: list[int], n: int) -> tuple[float, float]:
        counts = Counts()
        tokens: list[int] = []
        start = time.perf_counter()
        first = None
        for step in speculative_steps(decoder, ids, n, speculation, counts=counts, stop_at_eos=False):
            first = first or time.perf_counter()
            tokens.append(step.token)
        total = time.perf_counter() - start
        if n > 4:  # the timed runs, not the warm-up
            tally["drafted"] += counts.drafted
            tally["accepted"] += counts.accepted
            extra["acceptance_rate"] = round(tally["accepted"] / max(tally["drafted"], 1), 3)
            if "greedy_equal" not in extra:
                plain = [step.token for step in generate(decoder, ids, n, stop_at_eos=False)]
                at, gap = divergence(decoder, ids, tokens, plain)
                extra.update(greedy_equal=at is None, diverged_at=at, diverged_gap=gap)
        return first - start, total

    return run, decoder.provider, None


def _llama_cpp(gguf: Path, threads: int) -> tuple[RunFn, str, ProfileFn | None]:
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

    return run, "llama.cpp CPU", None


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


def _optimum(export_dir: Path, threads: int) -> tuple[RunFn, str, ProfileFn | None]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    def load(options: ort.SessionOptions) -> ORTModelForCausalLM:
        return ORTModelForCausalLM.from_pretrained(str(export_dir), provider="CPUExecutionProvider",
                                                   session_options=options, use_cache=True)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = load(options)

    def profile(ids: list[int], n: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            profiled = load(_profiled_options(threads, tmp))
            x = torch.tensor([ids])
            profiled.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n)
            return products_share(Path(profiled.session.end_profiling()))

    return _hf_generate(model, torch), "optimum ORT CPU", profile


def _transformers(gguf: Path, threads: int) -> tuple[RunFn, str, ProfileFn | None]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    return _hf_generate(model, torch), "PyTorch CPU", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", required=True,
                        choices=["calm", "calm+draft", "llama.cpp", "optimum", "transformers"])
    parser.add_argument("--draft", default="prompt-lookup", help="calm+draft: prompt-lookup or a draft's export")
    parser.add_argument("--k", default="4", help="calm+draft: draft tokens per check, or adaptive")
    parser.add_argument("--path", type=Path, required=True, help="export directory or GGUF file")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report_to, sys.stdout = sys.stdout, sys.stderr
    ids = [int(t) for t in args.prompt_ids.split(",")]
    start = time.perf_counter()
    extra: dict = {}
    if args.system == "calm+draft":
        run, provider, profile = _calm_draft(args.path, args.draft, args.k, extra)
    else:
        build = {"calm": _calm, "llama.cpp": _llama_cpp, "optimum": _optimum, "transformers": _transformers}
        run, provider, profile = build[args.system](args.path, args.threads)
    load_s = time.perf_counter() - start
    run(ids, 4)  # warm-up: first-call allocations are not the steady state
    ttfts, rates = [], []
    for _ in range(args.repeats):
        ttft, total = run(ids, args.tokens)
        ttfts.append(ttft)
        rates.append((args.tokens - 1) / (total - ttft))
    row = {
        "system": args.system, "provider": provider, "threads": args.threads, "load_s": round(load_s, 3),
        "ttft_ms": round(statistics.median(ttfts) * 1000, 1), "decode_tok_s": round(statistics.median(rates), 2),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # before the profiled load
        "prompt_tokens": len(ids), "new_tokens": args.tokens,
    }
    row["products_share"] = None if profile is None else round(profile(ids, args.tokens), 3)
    row |= extra
    print(json.dumps(row), file=report_to, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
