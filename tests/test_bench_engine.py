"""`calm bench engine` on the real smallest model: calm and Optimum's ORTModel measured side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from calm_cli.bench.engine import _add_ratios
from calm_cli.cli import main


def test_ratios_compare_like_with_like() -> None:
    rows = [
        {"model": "m", "system": "llama.cpp", "precision": "gguf", "threads": 1, "decode_tok_s": 40.0},
        {"model": "m", "system": "llama.cpp", "precision": "gguf", "threads": 2, "decode_tok_s": 50.0},
        {"model": "m", "system": "optimum", "precision": "int4", "threads": 1, "decode_tok_s": 20.0},
        {"model": "m", "system": "optimum", "precision": "fp32", "threads": 1, "decode_tok_s": 10.0},
        {"model": "m", "system": "calm", "precision": "int4", "threads": 1, "decode_tok_s": 44.0},
        {"model": "m", "system": "calm", "precision": "fp32", "threads": 1, "decode_tok_s": 25.0},
    ]
    _add_ratios(rows)
    calm_int4, calm_fp32 = rows[4], rows[5]
    assert calm_int4["vs_llama_cpp"] == 1.1 and calm_int4["vs_llama_cpp_best"] == 0.88
    assert calm_int4["vs_optimum"] == 2.2 and calm_fp32["vs_optimum"] == 2.5  # same precision, same threads
    assert rows[2]["vs_optimum"] is None  # only calm's rows carry it


@pytest.mark.fleet
def test_bench_engine_runs_calm_and_optimum_on_the_same_export(fleet_store, tmp_path: Path) -> None:
    pytest.importorskip("optimum.onnxruntime")
    exported = CliRunner().invoke(main, ["models", "export", "smollm2-135m", "--precision", "int4"])
    assert exported.exit_code == 0, exported.output
    out = tmp_path / "engine.json"
    result = CliRunner().invoke(main, ["bench", "engine", "--models", "smollm2-135m", "--systems", "calm,optimum",
                                       "--precision", "int4", "--threads", "1", "--tokens", "8", "--repeats", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["system"], r["precision"]) for r in rows] == [("calm", "int4"), ("optimum", "int4")]
    calm, optimum = rows
    assert calm["decode_tok_s"] > 0 and optimum["decode_tok_s"] > 0 and calm["ttft_ms"] > 0
    assert calm["vs_optimum"] == round(calm["decode_tok_s"] / optimum["decode_tok_s"], 2)
    assert "vs_optimum" in result.output
