"""`calm bench engine` on the real smallest model: calm and Optimum's ORTModel measured side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from calm_cli.bench.engine import _add_ratios
from calm_cli.bench.engine_worker import products_share
from calm_cli.cli import main


def test_ratios_compare_like_with_like() -> None:
    rows = [
        {"model": "m", "system": "llama.cpp", "precision": "gguf", "threads": 1, "decode_tok_s": 40.0},
        {"model": "m", "system": "llama.cpp", "precision": "gguf", "threads": 2, "decode_tok_s": 50.0},
        {"model": "m", "system": "optimum", "precision": "int4", "threads": 1, "decode_tok_s": 20.0},
        {"model": "m", "system": "optimum", "precision": "fp32", "threads": 1, "decode_tok_s": 10.0},
        {"model": "m", "system": "calm", "precision": "int4", "threads": 1, "decode_tok_s": 44.0,
         "products_share": 0.8},
        {"model": "m", "system": "calm", "precision": "fp32", "threads": 1, "decode_tok_s": 25.0},
        {"model": "m", "system": "calm+draft", "precision": "int4", "threads": 1, "decode_tok_s": 60.0,
         "prompt": "code"},
        {"model": "m", "system": "llama.cpp", "precision": "gguf", "threads": 1, "decode_tok_s": 30.0,
         "prompt": "code"},
    ]
    for row in rows:
        row.setdefault("prompt", "prose")
    _add_ratios(rows)
    assert rows[6]["vs_llama_cpp"] == 2.0 and rows[6]["vs_llama_cpp_best"] == 2.0  # against the same prompt
    calm_int4, calm_fp32 = rows[4], rows[5]
    assert calm_int4["vs_llama_cpp"] == 1.1 and calm_int4["vs_llama_cpp_best"] == 0.88
    assert calm_int4["vs_optimum"] == 2.2 and calm_fp32["vs_optimum"] == 2.5  # same precision, same threads
    assert rows[2]["vs_optimum"] is None  # only calm's rows carry it
    # calm is 2.2x Optimum with 80% of its step in the weight products that both run: at most 2.75x.
    assert calm_int4["vs_optimum_ceiling"] == 2.75
    assert calm_fp32["vs_optimum_ceiling"] is None  # no profile, no ceiling


def _profile_of(runs: int, tmp_path: Path) -> Path:
    """A real onnxruntime profile of `runs` runs of x @ W -> Relu."""
    w = numpy_helper.from_array(np.ones((256, 256), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
                               helper.make_node("Relu", ["h"], ["y"], name="act")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "p")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"x": np.ones((1, 256), np.float32)})
    return Path(session.end_profiling())


def test_products_share_counts_the_decode_steps_products_only(tmp_path: Path) -> None:
    """Hand-written profile events with known durations: the prompt run and non-product kernels are left out."""
    def run(ts: int, dur: int) -> dict:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def kernel(name: str, op: str, ts: int, dur: int) -> dict:
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0, 500), kernel("proj", "MatMulNBits", 10, 400),  # the prompt: left out
              run(1000, 100), kernel("proj", "MatMulNBits", 1010, 30), kernel("act", "Relu", 1050, 20),
              kernel("/l0/BlockSum", "ReduceSum", 1070, 10),  # the min correction of a product counts
              run(2000, 100), kernel("proj", "MatMulNBits", 2010, 40), kernel("norm", "SimplifiedLayerNorm", 2060, 30)]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(events))
    assert products_share(profile) == pytest.approx((30 + 10 + 40) / (100 + 100))


def test_products_share_of_a_real_profile_is_a_share(tmp_path: Path) -> None:
    profile = _profile_of(4, tmp_path)
    runs = [e for e in json.loads(profile.read_text()) if e.get("name") == "model_run"]
    assert len(runs) == 4
    assert 0 < products_share(profile) < 1  # the Relu and the run's own overhead are not products


def test_products_share_needs_a_decode_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 runs profiled"):
        products_share(_profile_of(1, tmp_path))


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
    assert 0 < calm["products_share"] < 1 and 0 < optimum["products_share"] < 1
    assert calm["vs_optimum_ceiling"] == round(calm["decode_tok_s"] / optimum["decode_tok_s"]
                                               / calm["products_share"], 2)
    assert "vs_optimum_ceiling" in result.output


@pytest.mark.fleet
def test_bench_engine_calm_with_drafts_on_code_and_prose(fleet_store, tmp_path: Path) -> None:
    """calm+draft rows: prompt lookup on each prompt, with the acceptance rate and whether the tokens equal
    calm's plain greedy tokens."""
    exported = CliRunner().invoke(main, ["models", "export", "smollm2-135m", "--precision", "int4"])
    assert exported.exit_code == 0, exported.output
    out = tmp_path / "engine.json"
    result = CliRunner().invoke(main, ["bench", "engine", "--models", "smollm2-135m", "--systems", "calm,calm+draft",
                                       "--precision", "int4", "--threads", "1", "--tokens", "24", "--repeats", "1",
                                       "--prompts", "code,prose", "--k", "adaptive", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["prompt"], r["system"]) for r in rows] == [("code", "calm"), ("code", "calm+draft"),
                                                         ("prose", "calm"), ("prose", "calm+draft")]
    for row in rows[1::2]:
        assert row["draft"] == "prompt-lookup" and row["k"] == "adaptive" and row["decode_tok_s"] > 0
        assert 0 <= row["acceptance_rate"] <= 1 and isinstance(row["greedy_equal"], bool)
        assert row["greedy_equal"] == (row["diverged_at"] is None)
    bad = CliRunner().invoke(main, ["bench", "engine", "--prompts", "poetry"])
    assert bad.exit_code == 2 and "--prompts takes prose, code" in bad.output
