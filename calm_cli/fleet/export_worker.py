"""The export itself, run as a child process by export.py.

Its stdout is calm's channel: one JSON line per phase ({"phase": "ONNX export"}) and the report last
({"report": {...}}). Everything else the libraries print, from Python or from C (TracerWarnings, Optimum's
chatter), goes to stderr, which export.py sends to a log file.

Generative models: transformers loads the GGUF (dequantized to fp32), Optimum exports the in-memory model
(text-generation-with-past), and for int4 the fp32 graph's MatMuls are rewritten to carry the GGUF's own
quantized blocks (int4.py). The tokenizer is built from the GGUF's metadata (gguf_tokenizer.py), never by
transformers' GGUF converter, which gets these files wrong. The encoder is exported as feature-extraction
and quantized to int8 per channel with onnxruntime's own dynamic quantizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from calm_cli.fleet import lock
from calm_cli.fleet.lock import ModelSpec

ONNX_FILES = ("model.onnx", "model.onnx_data", "model.onnx.data")
_channel = sys.stdout  # main() points it at a private copy of the original stdout


def _send(kind: str, value: object) -> None:
    _channel.write(json.dumps({kind: value}) + "\n")
    _channel.flush()


def _phase(message: str) -> None:
    """One line for the user; also marked in the log, so that warnings can be placed in their phase."""
    _log(f"== {message}")
    _send("phase", message)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _optimum_export(model_or_path, out: Path, task: str) -> None:
    from optimum.exporters.onnx import main_export, onnx_export_from_model

    if isinstance(model_or_path, Path):
        main_export(str(model_or_path), output=str(out), task=task, do_validation=False, library_name="transformers")
    else:
        onnx_export_from_model(model_or_path, str(out), task=task, do_validation=False)


def export_decoder(spec: ModelSpec, source: Path, out: Path, precision: str, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from calm_cli.fleet import gguf_tokenizer

    gguf = source / "model.gguf"
    report: dict = {}
    with tempfile.TemporaryDirectory(dir=work, prefix=f"export-{spec.name}-") as tmp:
        fp32_dir = out if precision == "fp32" else Path(tmp) / "fp32"
        t0 = time.perf_counter()
        _phase("loading GGUF")
        model = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf.name, dtype=torch.float32)
        _phase("ONNX export")
        _optimum_export(model, fp32_dir, spec.task)
        del model
        report["fp32_export_s"] = round(time.perf_counter() - t0, 1)
        if precision == "int4":
            from calm_cli.fleet.graph import int4

            t0 = time.perf_counter()
            _phase("int4 blocks")
            levels = spec.accuracy_levels
            result = int4.quantize_from_gguf(fp32_dir / "model.onnx", gguf, out / "model.onnx",
                                             accuracy_level=levels["4bit"], accuracy_level_8bit=levels["8bit"])
            _log(result.summary())
            report["int4"] = {"matmuls": result.per_type, "min_corrected": result.min_corrected,
                              "left_fp32": result.left_fp32, "accuracy_levels": levels,
                              "weights_mb": [round(result.weight_bytes_before / 2**20, 1),
                                             round(result.weight_bytes_after / 2**20, 1)]}
            report["int4_s"] = round(time.perf_counter() - t0, 1)
            for name in ("config.json", "generation_config.json"):
                if (fp32_dir / name).is_file():
                    shutil.copy2(fp32_dir / name, out / name)
    from calm_cli.fleet.graph import fuse

    _phase("fused graph")
    try:  # the compact CPU graph beside Optimum's (graph/fuse.py); a model it cannot take keeps the plain one only
        fuse.fuse_export(out)
        report["fused"] = True
    except fuse.Unsupported as exc:
        _phase(f"no fused graph ({exc})")
        report["fused"] = False
    gguf_tokenizer.build_tokenizer(gguf).save(out)
    return report


def export_encoder(spec: ModelSpec, source: Path, out: Path, precision: str, work: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=work, prefix=f"export-{spec.name}-") as tmp:
        fp32_dir = out if precision == "fp32" else Path(tmp) / "fp32"
        _phase("ONNX export")
        _optimum_export(source, fp32_dir, spec.task)
        if precision == "int8":
            _phase("int8 quantization")
            # per_channel: cosine to fp32 >= 0.99; per-tensor int8 fell to 0.95 (FLEET.md).
            quantize_dynamic(fp32_dir / "model.onnx", out / "model.onnx", per_channel=True,
                             weight_type=QuantType.QInt8)
    for stray in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (out / stray).unlink(missing_ok=True)  # serving reads the pinned tokenizer.json alone
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(source / name, out / name)  # the pinned files, not transformers' re-serialisation
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    global _channel
    _channel = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stdout writes, Python's or C's, join stderr from here on
    spec = lock.load()[args.model]
    args.work.mkdir(parents=True, exist_ok=True)
    build = export_decoder if spec.generative else export_encoder
    report = build(spec, args.source, args.out, args.precision, args.work)
    licences = args.source / "LICENSES"
    if licences.is_dir():
        shutil.copytree(licences, args.out / "LICENSES")
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    report["files_mb"] = round(sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 2**20, 1)
    _send("report", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
