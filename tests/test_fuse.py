"""The fused decoder graph (fleet/graph/fuse.py) against Optimum's plain graph on tiny random models (llama, qwen2,
gemma3), in fp32 and with the GGUF-block MatMulNBits of the int4 rewrite: same greedy tokens, scores and
logits within 1e-4, batches and the growing-cache step included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")
gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from calm_cli.engine import decode  # noqa: E402
from calm_cli.engine.batch import generate_batch  # noqa: E402
from calm_cli.engine.decoder import Decoder  # noqa: E402
from calm_cli.engine.kv import empty_past  # noqa: E402
from calm_cli.engine.session import FUSED_GRAPH  # noqa: E402
from calm_cli.fleet.graph import fuse  # noqa: E402
from calm_cli.fleet.export_worker import _optimum_export  # noqa: E402
from calm_cli.fleet.graph.int4 import quantize_from_gguf  # noqa: E402
from gguf_fixtures import random_blocks  # noqa: E402
from tiny_models import EOS, save_tokenizer, tiny_model  # noqa: E402

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}
# GGUF type per projection: q/k/v of layer 0 differ in format (three products), layer 1 concatenates them;
# gate Q4_0 (default zero point, no mins) with up Q4_1 (zero points and mins) concatenate; 8-bit downs.
TYPES = {"q_proj": Q.Q4_1, "k_proj": Q.Q4_1, "o_proj": Q.Q4_0, "gate_proj": Q.Q4_0, "up_proj": Q.Q4_1,
         "down_proj": Q.Q5_1}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _quantize_into_gguf(model, arch: str, path: Path) -> None:
    """Give every projection (and the embedding / lm_head) GGUF-block values and write those blocks to a GGUF."""
    rng = np.random.default_rng(7)
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH[arch])
    cfg = model.config
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)

    def put(name: str, module: torch.nn.Linear | torch.nn.Embedding, qtype: Q) -> None:
        rows, cols = module.weight.shape
        raw = random_blocks(rng, qtype, rows, cols, scale=0.02)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)))

    put("token_embd.weight", model.model.embed_tokens, Q.Q8_0)
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head, Q.Q8_0)
    for i, layer in enumerate(model.model.layers):
        for kind, gname in GGUF_NAMES.items():
            module = getattr(layer.mlp if kind in ("gate_proj", "up_proj", "down_proj") else layer.self_attn, kind)
            qtype = Q.Q8_0 if kind == "v_proj" and i == 0 else TYPES.get(kind, Q.Q4_1)
            put(f"blk.{i}.{gname}.weight", module, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[(a, p) for p in ("fp32", "int4") for a in ("llama", "qwen2", "gemma3")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, tmp_path_factory) -> tuple[Decoder, Decoder]:
    """(plain, fused) decoders of one tiny model."""
    arch, precision = request.param
    root = tmp_path_factory.mktemp(f"{arch}-{precision}")
    model = tiny_model(arch)
    plain = root / "plain"
    if precision == "fp32":
        _optimum_export(model, plain, "text-generation-with-past")
    else:
        _quantize_into_gguf(model, arch, root / "tiny.gguf")
        _optimum_export(model, root / "fp32", "text-generation-with-past")
        # fp32 activations (accuracy level 0): the products are exact, so both graphs can be held to 1e-4
        quantize_from_gguf(root / "fp32" / "model.onnx", root / "tiny.gguf", plain / "model.onnx", accuracy_level=0)
        shutil.copy2(root / "fp32" / "config.json", plain / "config.json")
    save_tokenizer(plain)
    fused = root / "fused"
    shutil.copytree(plain, fused)
    fuse.fuse_export(fused)
    return Decoder.load(plain), Decoder.load(fused)


def test_the_fused_graph_is_served_and_compact(pair) -> None:
    plain, fused = pair
    assert not plain.fused and fused.fused
    graph = onnx.load(str(fused.directory / FUSED_GRAPH), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops and not ops & {"ConstantOfShape", "Range", "Expand", "Where", "Softmax"}
    plain_graph = onnx.load(str(plain.directory / "model.onnx"), load_external_data=False).graph
    assert len(graph.node) * 5 < len(plain_graph.node)


def test_greedy_tokens_equal_the_plain_graph(pair) -> None:
    plain, fused = pair
    generator = np.random.default_rng(1)
    for length in (1, 5, 23):  # 23 > the gemma3 sliding window
        prompt = generator.integers(0, EOS, length).tolist()
        assert list(decode.greedy(fused, prompt, 20)) == list(decode.greedy(plain, prompt, 20)), \
            f"prompt length {length}"


def test_scores_and_logits_match_the_plain_graph(pair) -> None:
    plain, fused = pair
    ids = np.random.default_rng(2).integers(0, EOS, 17).tolist()
    assert np.allclose(decode.logits(fused, ids), decode.logits(plain, ids), atol=1e-4)
    assert np.allclose(decode.score(fused, ids[:9], ids[9:]), decode.score(plain, ids[:9], ids[9:]), atol=1e-4)


def test_generation_logprobs_match_scoring(pair) -> None:
    _, fused = pair
    prompt = [3, 14, 15, 92, 65]
    steps = list(decode.generate(fused, prompt, 8, stop_at_eos=False))
    assert np.allclose([s.logprob for s in steps], decode.score(fused, prompt, [s.token for s in steps]), atol=1e-4)


def test_batches_are_right_padded_and_equal_one_by_one(pair) -> None:
    plain, fused = pair
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    want = [list(decode.greedy(plain, p, 10)) for p in prompts]
    assert generate_batch(fused, prompts, 10) == want == generate_batch(plain, prompts, 10)


def test_growing_cache_steps_branch_from_one_context(pair) -> None:
    """`forward` with a numpy past (one context, several continuations) gives the scores `score` gives."""
    plain, fused = pair
    context, branches = [5, 6, 7, 8, 9], [[10, 11, 12], [13, 14]]
    n = len(context)
    _, past = decode.forward(fused, np.asarray([context]), np.ones((1, n), np.int64), np.arange(n)[None],
                             empty_past(fused, 1))
    for branch in branches:
        total = n + len(branch)
        logits, _ = decode.forward(fused, np.asarray([branch]), np.ones((1, total), np.int64),
                                   np.arange(n, total)[None], past)
        assert np.allclose(logits[0], decode.logits(plain, context + branch)[n:], atol=1e-4)


def test_unknown_architectures_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}), encoding="utf-8")
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])), str(tmp_path / "model.onnx"))
    with pytest.raises(fuse.Unsupported, match="phi3"):
        fuse.fuse_export(tmp_path)
    assert not (tmp_path / FUSED_GRAPH).exists()


def test_block_sums_by_reduction_equal_block_sums_by_product(pair, tmp_path, monkeypatch) -> None:
    """Large K takes the Reshape + ReduceSum block sums instead of the 0/1 product: same logits."""
    plain, fused = pair
    if not any(n.op_type == "MatMulNBits" for n in onnx.load(str(plain.directory / "model.onnx"),
                                                               load_external_data=False).graph.node):
        pytest.skip("fp32: no min corrections")
    monkeypatch.setattr(fuse._Builder, "ONES_BYTES", 0)
    shutil.copytree(plain.directory, tmp_path / "reduced")
    fuse.fuse_export(tmp_path / "reduced")
    reduced = Decoder.load(tmp_path / "reduced")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "reduced" / FUSED_GRAPH), load_external_data=False).graph.node}
    assert "ReduceSum" in ops
    ids = [7, 1, 8, 2, 8, 1, 8, 2, 8]
    assert np.allclose(decode.logits(reduced, ids), decode.logits(fused, ids), atol=1e-4)
