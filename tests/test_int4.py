"""MatMulNBits rewrite from GGUF blocks, on a tiny graph and a tiny GGUF written by the test."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from onnx import TensorProto, helper, numpy_helper

from gguf_fixtures import FP16_FIELDS, random_blocks
from calm_cli.fleet.gguf_blocks import decode_blocks, llama_unpermute_rows
from calm_cli.fleet.graph.int4 import GGUFWeightMismatch, quantize_from_gguf, to_matmulnbits

IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime 1.31 reads up to 13
HIDDEN, FFN, N_HEAD, N_HEAD_KV = 256, 512, 4, 2
HEAD_DIM = HIDDEN // N_HEAD

# (onnx module, gguf tensor, type, rows N, cols K, which graph input feeds it)
LAYOUT = [
    ("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight", Q.Q4_K, HIDDEN, HIDDEN, "x"),
    ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", Q.Q6_K, N_HEAD_KV * HEAD_DIM, HIDDEN, "x"),
    ("model.layers.0.self_attn.v_proj", "blk.0.attn_v.weight", Q.Q8_0, N_HEAD_KV * HEAD_DIM, HIDDEN, "x"),
    ("model.layers.0.self_attn.o_proj", "blk.0.attn_output.weight", Q.Q4_0, HIDDEN, HIDDEN, "x"),
    ("model.layers.0.mlp.gate_proj", "blk.0.ffn_gate.weight", Q.Q5_0, FFN, HIDDEN, "x"),
    ("model.layers.0.mlp.up_proj", "blk.0.ffn_up.weight", Q.Q4_1, FFN, HIDDEN, "x"),
    ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", Q.Q5_K, HIDDEN, FFN, "h"),
    ("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", Q.Q5_1, HIDDEN, HIDDEN, "x"),
    ("model.layers.1.self_attn.k_proj", "blk.1.attn_k.weight", Q.Q4_1, N_HEAD_KV * HEAD_DIM, HIDDEN, "x"),
    # odd number of blocks (K = 96): exercises 4-bit zero-point row padding
    ("model.layers.1.self_attn.o_proj", "blk.1.attn_output.weight", Q.Q4_1, 64, 96, "s"),
    ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight", Q.Q6_K, HIDDEN, FFN, "h"),
]
MIN_TYPES = (Q.Q4_1, Q.Q4_K, Q.Q5_1, Q.Q5_K)


def _dequant_hf(raw: np.ndarray, qtype: Q, gguf_name: str) -> np.ndarray:
    """The weight as transformers holds it ([N, K]): llama q/k rows un-permuted."""
    w = gguf.quants.dequantize(raw, qtype)
    kind = gguf_name.split(".")[-2]
    if kind in ("attn_q", "attn_k"):
        w = w[llama_unpermute_rows(w.shape[0], N_HEAD if kind == "attn_q" else N_HEAD_KV)]
    return np.ascontiguousarray(w, dtype=np.float32)


def build(tmp: Path, *, x_shape=("batch", "seq", HIDDEN), corrupt: str | None = None) -> tuple[Path, Path, dict]:
    """Write a tiny llama GGUF and an fp32 ONNX graph of MatMuls on its dequantized weights."""
    rng = np.random.default_rng(1234)
    gguf_path = tmp / "tiny.gguf"
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    w.add_block_count(2)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_embedding_length(HIDDEN)
    weights = {}
    for module, gname, qtype, n, k, _ in LAYOUT:
        raw = random_blocks(rng, qtype, n, k)
        w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=qtype)
        weights[module] = _dequant_hf(raw, qtype, gname)
    vocab = 128  # tied embeddings: no output.weight, llama.cpp uses token_embd for the lm_head
    raw = random_blocks(rng, Q.Q8_0, vocab, HIDDEN)
    w.add_tensor("token_embd.weight", raw, raw_shape=raw.shape, raw_dtype=Q.Q8_0)
    embed = gguf.quants.dequantize(raw, Q.Q8_0).astype(np.float32)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    inits, nodes, outputs = [], [], []
    for i, (module, _, _, n, k, src) in enumerate(LAYOUT):
        wt = weights[module].T.copy()  # MatMul B is [K, N]
        if corrupt == module:
            wt[3, 5] += 1e-3 * float(np.abs(wt).max())
        init = f"onnx::MatMul_{100 + i}"
        inits.append(numpy_helper.from_array(wt, init))
        name = "/" + module.replace(".", "/").replace("layers/", "layers.") + "/MatMul"
        y = f"y{i}"
        nodes.append(helper.make_node("MatMul", [src, init], [y], name=name))
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
    # lm_head through a Transpose of the (shared) embedding, which a Gather also reads
    inits.append(numpy_helper.from_array(embed, "model.embed_tokens.weight"))
    nodes.append(helper.make_node("Transpose", ["model.embed_tokens.weight"], ["embed_t"], perm=[1, 0], name="/lm_head/Transpose"))
    nodes.append(helper.make_node("MatMul", ["x", "embed_t"], ["logits"], name="/lm_head/MatMul"))
    nodes.append(helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["emb"], axis=0, name="/model/embed_tokens/Gather"))
    # a weight MatMul with no GGUF counterpart stays fp32 and is reported
    inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, 8)).astype(np.float32), "extra.weight"))
    nodes.append(helper.make_node("MatMul", ["x", "extra.weight"], ["extra"], name="/model/extra_head/MatMul"))
    # an activation x activation MatMul is not a weight and is left alone silently
    nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="/model/scores/Transpose"))
    nodes.append(helper.make_node("MatMul", ["x", "xt"], ["scores"], name="/model/scores/MatMul"))
    outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("logits", "emb", "extra", "scores")]

    def vi(name, dim):
        shape = None if x_shape is None else [*x_shape[:-1], dim]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inputs = [vi("x", HIDDEN), vi("h", FFN), vi("s", 96), helper.make_tensor_value_info("ids", TensorProto.INT64, [None])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=IR_VERSION)
    fp32_path = tmp / "fp32" / "model.onnx"
    fp32_path.parent.mkdir()
    onnx.save(model, str(fp32_path))
    return fp32_path, gguf_path, weights


def run(path: Path, feeds: dict) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def feeds_for(seq: int = 3) -> dict:
    rng = np.random.default_rng(7)
    return {
        "x": rng.standard_normal((2, seq, HIDDEN)).astype(np.float32),
        "h": rng.standard_normal((2, seq, FFN)).astype(np.float32),
        "s": rng.standard_normal((2, seq, 96)).astype(np.float32),
        "ids": np.array([1, 5, 127], np.int64),
    }


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


OUTS = [f"y{i}" for i in range(len(LAYOUT))] + ["logits"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int4")
    fp32, gg, _ = build(tmp)
    return tmp, fp32, gg, run(fp32, feeds_for())


def test_exact_at_accuracy_level_0(tiny):
    tmp, fp32, gg, ref = tiny
    out = tmp / "acc0" / "model.onnx"
    rep = quantize_from_gguf(fp32, gg, out, accuracy_level=0)
    got = run(out, feeds_for())
    for name in OUTS:
        assert rel_err(got[name], ref[name]) < 1e-5, name
    for name in ("emb", "extra", "scores"):
        np.testing.assert_array_equal(got[name], ref[name])
    assert rep.min_corrected == sum(1 for _, _, q, *_ in LAYOUT if q in MIN_TYPES)


def test_report_and_graph(tiny):
    tmp, fp32, gg, _ = tiny
    out = tmp / "acc4" / "model.onnx"
    rep = quantize_from_gguf(fp32, gg, out)
    want = {}
    for _, _, q, *_ in LAYOUT:
        want[q.name] = want.get(q.name, 0) + 1
    want["Q8_0"] += 1  # the lm_head, from token_embd
    assert rep.per_type == want
    assert rep.mapping["/lm_head/MatMul"] == "token_embd.weight"
    assert rep.mapping["/model/layers.0/self_attn/q_proj/MatMul"] == "blk.0.attn_q.weight"
    assert sorted(rep.unpermuted) == sorted(
        f"/model/layers.{i}/self_attn/{p}/MatMul" for i in (0, 1) for p in ("q_proj", "k_proj")
    )
    assert set(rep.left_fp32) == {"/model/extra_head/MatMul"}
    assert "no GGUF weight" in rep.left_fp32["/model/extra_head/MatMul"]
    assert 0 < rep.weight_bytes_after < rep.weight_bytes_before
    assert rep.file_bytes_after < rep.file_bytes_before
    assert "MatMulNBits" in rep.summary()

    m = onnx.load(str(out), load_external_data=False)
    assert (out.parent / "model.onnx.data").exists()
    inits = {t.name for t in m.graph.initializer}
    assert "model.embed_tokens.weight" in inits  # still read by the Gather
    assert "extra.weight" in inits
    assert not any(n.startswith("onnx::MatMul_") for n in inits)  # replaced fp32 weights are gone
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMulNBits") == len(LAYOUT) + 1
    assert ops.count("Transpose") == 1  # the lm_head's Transpose went, the activation one stayed
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert any(o.domain == "com.microsoft" for o in m.opset_import)


def test_accuracy_level_4_within_int8_activation_tolerance(tiny):
    tmp, fp32, gg, ref = tiny
    out = tmp / "acc4b" / "model.onnx"
    quantize_from_gguf(fp32, gg, out, accuracy_level=4)
    got = run(out, feeds_for())
    for name in OUTS:
        assert rel_err(got[name], ref[name]) < 2e-2, name


def test_mixed_accuracy_levels(tiny):
    tmp, fp32, gg, ref = tiny
    out = tmp / "mixed" / "model.onnx"
    quantize_from_gguf(fp32, gg, out, accuracy_level=0, accuracy_level_8bit=4)
    m = onnx.load(str(out), load_external_data=False)
    levels = {}
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: x.i for x in n.attribute}
            levels.setdefault(a["bits"], set()).add(a.get("accuracy_level", 0))
    assert levels == {4: {0}, 8: {4}}
    got = run(out, feeds_for())
    for i, (_, _, q, *_rest) in enumerate(LAYOUT):
        exact = q in (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # the 4-bit ones
        assert rel_err(got[f"y{i}"], ref[f"y{i}"]) < (1e-5 if exact else 2e-2)


def test_unknown_activation_rank_uses_generic_blocksum(tmp_path):
    fp32, gg, _ = build(tmp_path, x_shape=None)
    ref = run(fp32, feeds_for(seq=1))
    out = tmp_path / "generic" / "model.onnx"
    quantize_from_gguf(fp32, gg, out, accuracy_level=0)
    got = run(out, feeds_for(seq=1))
    for name in OUTS:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_mismatching_weight_is_refused(tmp_path):
    fp32, gg, _ = build(tmp_path, corrupt="model.layers.0.mlp.up_proj")
    with pytest.raises(GGUFWeightMismatch, match=r"up_proj.*blk\.0\.ffn_up\.weight.*Q4_1"):
        quantize_from_gguf(fp32, gg, tmp_path / "out" / "model.onnx")


@pytest.mark.parametrize("qtype", sorted(FP16_FIELDS, key=int), ids=lambda t: t.name)
def test_packed_operands_reproduce_the_gguf_values(qtype):
    """MatMulNBits' own dequantization of the packed operands, in numpy, equals the GGUF values."""
    rng = np.random.default_rng(int(qtype) + 50)
    n, k = 24, 768 if GGML_QUANT_SIZES[qtype][0] == 256 else 96
    qb = decode_blocks(random_blocks(rng, qtype, n, k), qtype, (n, k))
    nw = to_matmulnbits(qb)
    nb = k // nw.block_size
    if nw.bits == 4:
        b = nw.B.reshape(n, nb, -1)
        q = np.stack([b & 15, b >> 4], axis=-1).reshape(n, nb, nw.block_size).astype(np.float64)
        if nw.zero_points is None:
            z = np.full((n, nb), 8.0)
        else:
            zb = nw.zero_points.reshape(n, -1)
            z = np.stack([zb & 15, zb >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float64)
    else:
        assert nw.zero_points is None
        q = nw.B.reshape(n, nb, nw.block_size).astype(np.float64)
        z = np.full((n, nb), 128.0)
    w = nw.scales.reshape(n, nb, 1).astype(np.float64) * (q - z[..., None])
    if nw.mins_t is not None:
        w = w - nw.mins_t.T.reshape(n, nb, 1)
    ref = qb.dequantize().astype(np.float64)
    np.testing.assert_allclose(w.reshape(n, k), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
