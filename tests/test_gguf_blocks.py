"""GGUF block decoding must reproduce gguf-py's reference dequantization bit for bit."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from gguf_fixtures import random_blocks
from calm_cli.fleet.gguf_blocks import (
    SUPPORTED_TYPES,
    QuantBlocks,
    UnsupportedQuantType,
    decode_blocks,
    decode_reader_tensor,
    llama_unpermute_rows,
)

# gguf-py implements quantize() for these; the K-quants only have dequantize().
GGUF_PY_QUANTIZES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
EXPECTED = {  # (bits, block_size, zero_point or "mins")
    Q.Q4_0: (4, 32, 8),
    Q.Q4_1: (4, 32, "mins"),
    Q.Q5_0: (8, 32, 16),
    Q.Q5_1: (8, 32, "mins"),
    Q.Q8_0: (8, 32, 128),
    Q.Q4_K: (4, 32, "mins"),
    Q.Q5_K: (8, 32, "mins"),
    Q.Q6_K: (8, 16, 32),
}


def _formula(qb: QuantBlocks) -> np.ndarray:
    """The documented representation, evaluated independently in float64."""
    s = np.repeat(qb.scales.astype(np.float64), qb.block_size, axis=1)
    q = qb.codes.astype(np.float64)
    if qb.mins is not None:
        return s * q - np.repeat(qb.mins.astype(np.float64), qb.block_size, axis=1)
    return s * (q - qb.zero_point)


def test_supported_types_are_the_expected_ones():
    assert set(SUPPORTED_TYPES) == set(EXPECTED)


@pytest.mark.parametrize("qtype", sorted(EXPECTED, key=int), ids=lambda t: t.name)
def test_random_blocks_match_gguf_dequantize_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 7, 512
    raw = random_blocks(rng, qtype, rows, cols)
    qb = decode_blocks(raw, qtype, (rows, cols), name="t")
    ref = gguf.quants.dequantize(raw, qtype)
    assert ref.shape == (rows, cols)
    got = qb.dequantize()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)

    bits, block, zp = EXPECTED[qtype]
    assert (qb.bits, qb.block_size, qb.qtype) == (bits, block, qtype.name)
    assert qb.codes.shape == (rows, cols) and qb.codes.dtype == np.uint8
    assert qb.scales.shape == (rows, cols // block) and qb.scales.dtype == np.float32
    assert int(qb.codes.max()) < 2**bits
    if zp == "mins":
        assert qb.zero_point is None and qb.mins.shape == qb.scales.shape
    else:
        assert qb.mins is None and qb.zero_point == zp
    np.testing.assert_allclose(_formula(qb), ref, rtol=1e-6, atol=1e-6 * float(np.abs(ref).max()))


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda t: t.name)
def test_gguf_py_quantized_blocks_match_exactly(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    qb = decode_blocks(raw, qtype)  # shape taken from the [rows, bytes] layout
    np.testing.assert_array_equal(qb.dequantize(), gguf.quants.dequantize(raw, qtype))


def test_q8_0_codes_are_offset_int8():
    rng = np.random.default_rng(3)
    raw = random_blocks(rng, Q.Q8_0, 2, 64)
    qb = decode_blocks(raw, Q.Q8_0, (2, 64))
    q = raw.reshape(2, 2, 34)[..., 2:].view(np.int8).reshape(2, 64)
    np.testing.assert_array_equal(qb.codes.astype(np.int16) - 128, q)


@pytest.mark.parametrize("qtype", [Q.Q3_K, Q.Q2_K, Q.IQ4_NL, Q.F16], ids=lambda t: t.name)
def test_unsupported_type_names_tensor_and_type(qtype):
    blk, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, 256 // blk * type_size), dtype=np.uint8)
    with pytest.raises(UnsupportedQuantType, match=rf"blk\.3\.ffn_up\.weight.*{qtype.name}"):
        decode_blocks(raw, qtype, (2, 256), name="blk.3.ffn_up.weight")


def test_wrong_byte_count_is_refused():
    raw = np.zeros((2, 18), dtype=np.uint8)
    with pytest.raises(ValueError):
        decode_blocks(raw, Q.Q4_0, (2, 64))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute for q/k (the forward direction)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("rows,n_head", [(64, 4), (32, 2), (576, 9), (192, 3)])
def test_llama_unpermute_inverts_llama_cpp_permute(rows, n_head):
    hf = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    stored = _llama_cpp_permute(hf, n_head)
    idx = llama_unpermute_rows(rows, n_head)
    np.testing.assert_array_equal(stored[idx], hf)
    # the same as transformers' reverse permutation of the GGUF rows
    dim = rows // n_head // 2
    np.testing.assert_array_equal(stored.reshape(n_head, dim, 2, 3).swapaxes(2, 1).reshape(rows, 3), hf)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q4_1], ids=lambda t: t.name)
def test_row_permutation_moves_codes_scales_and_mins(qtype):
    rng = np.random.default_rng(9)
    rows, cols = 64, 256
    qb = decode_blocks(random_blocks(rng, qtype, rows, cols), qtype, (rows, cols))
    idx = llama_unpermute_rows(rows, 4)
    np.testing.assert_array_equal(qb.take_rows(idx).dequantize(), qb.dequantize()[idx])


def test_quantblocks_needs_exactly_one_offset_form():
    codes = np.zeros((1, 32), np.uint8)
    s = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError):
        QuantBlocks(codes, s, None, None, 4, 32)
    with pytest.raises(ValueError):
        QuantBlocks(codes, s, s, 8, 4, 32)


REAL_MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


@pytest.mark.fleet
@pytest.mark.parametrize("model", REAL_MODELS)
def test_real_gguf_weights_decode_exactly(gguf_file, model):
    """Every 2-D block-quantized tensor of the real GGUFs (first rows of each), exact."""
    reader = gguf.GGUFReader(str(gguf_file(model)))
    seen: dict[str, int] = {}
    full_checked: set[str] = set()
    for t in reader.tensors:
        if len(t.shape) != 2 or t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            continue
        assert t.tensor_type in SUPPORTED_TYPES, f"{model}: {t.name} is {t.tensor_type.name}"
        cols, rows = (int(x) for x in t.shape)
        n = min(rows, 64)
        raw = np.asarray(t.data[:n])
        qb = decode_blocks(raw, t.tensor_type, (n, cols), name=t.name)
        np.testing.assert_array_equal(qb.dequantize(), gguf.quants.dequantize(raw, t.tensor_type), err_msg=t.name)
        if t.tensor_type.name not in full_checked and rows * cols <= 8_000_000:
            full = decode_reader_tensor(t)
            np.testing.assert_array_equal(full.dequantize(), gguf.quants.dequantize(t.data, t.tensor_type))
            full_checked.add(t.tensor_type.name)
        seen[t.tensor_type.name] = seen.get(t.tensor_type.name, 0) + 1
    assert seen, f"{model}: no block-quantized 2-D tensors"
