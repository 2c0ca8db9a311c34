"""Decode GGUF block-quantized tensors into codes, scales and mins, bit for bit.

llama.cpp stores a quantized weight as rows of fixed-size blocks; each block holds small
integer codes plus one or two fp16 constants. This module turns a tensor's raw block bytes
into one uniform representation, :class:`QuantBlocks`, from which onnxruntime's
``MatMulNBits`` operands can be packed without any re-quantization:

    value[r, c] == scales[r, c // block_size] * (codes[r, c] - zero_point)      (zero_point form)
    value[r, c] == scales[r, c // block_size] * codes[r, c] - mins[r, c // block_size]   (min form)

Both forms are evaluated in float32 in the same order as gguf-py's reference decoders
(``gguf.quants.dequantize``), so :meth:`QuantBlocks.dequantize` reproduces them exactly.

Supported types and their mapping (``bits`` is the MatMulNBits storage width, not the GGUF one):

=====  ==========================  =====  ==========  ==========================
type   GGUF value                  bits   block_size  representation
=====  ==========================  =====  ==========  ==========================
Q4_0   d * (q - 8), q in 0..15     4      32          scales=d, zero_point=8
Q4_1   d * q + m                   4      32          scales=d, mins=-m
Q5_0   d * (q - 16), q in 0..31    8      32          scales=d, zero_point=16
Q5_1   d * q + m, q in 0..31       8      32          scales=d, mins=-m
Q8_0   d * q, q int8               8      32          codes=q+128, zero_point=128
Q4_K   d*sc*q - dmin*m (8 x 32)    4      32          scales=d*sc, mins=dmin*m
Q5_K   same, 5-bit q               8      32          scales=d*sc, mins=dmin*m
Q6_K   d*sc*(q - 32) (16 x 16)     8      16          scales=d*sc, zero_point=32
=====  ==========================  =====  ==========  ==========================

:class:`GGUFFile` finds a transformers module's weight in a GGUF file and the row orders to try for it.

Needs numpy and gguf (gguf-py) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from calm_cli.errors import CalmError

__all__ = [
    "GGUFFile",
    "QuantBlocks",
    "UnsupportedQuantType",
    "SUPPORTED_TYPES",
    "decode_blocks",
    "decode_reader_tensor",
    "llama_unpermute_rows",
    "permute_rows",
]


class UnsupportedQuantType(CalmError):
    """The GGUF tensor's block type has no exact MatMulNBits representation here."""


@dataclass(frozen=True)
class QuantBlocks:
    """A block-quantized matrix: ``rows`` output features by ``cols`` input features.

    Exactly one of ``mins`` and ``zero_point`` is set.
    """

    codes: np.ndarray  # uint8 [rows, cols], each < 2**bits
    scales: np.ndarray  # float32 [rows, n_blocks]
    mins: np.ndarray | None  # float32 [rows, n_blocks]: value = scales*codes - mins
    zero_point: int | None  # value = scales*(codes - zero_point)
    bits: int  # 4 or 8
    block_size: int  # values per block along cols
    qtype: str = ""  # GGUF type name it came from, e.g. "Q4_K"

    def __post_init__(self) -> None:
        if (self.mins is None) == (self.zero_point is None):
            raise ValueError("QuantBlocks needs exactly one of mins and zero_point")
        if self.codes.dtype != np.uint8 or self.codes.ndim != 2:
            raise ValueError("codes must be a 2-D uint8 array")
        rows, cols = self.codes.shape
        if cols % self.block_size:
            raise ValueError(f"cols {cols} is not a multiple of block_size {self.block_size}")
        want = (rows, cols // self.block_size)
        if self.scales.shape != want or (self.mins is not None and self.mins.shape != want):
            raise ValueError(f"scales/mins must have shape {want}")

    @property
    def rows(self) -> int:
        return int(self.codes.shape[0])

    @property
    def cols(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_blocks(self) -> int:
        return self.cols // self.block_size

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], equal to gguf.quants.dequantize of the source bytes."""
        rows, nb, bs = self.rows, self.n_blocks, self.block_size
        s = self.scales.reshape(rows, nb, 1)
        if self.mins is not None:
            q = self.codes.reshape(rows, nb, bs).astype(np.float32)
            v = s * q - self.mins.reshape(rows, nb, 1)
        else:
            q = (self.codes.reshape(rows, nb, bs).astype(np.int16) - np.int16(self.zero_point)).astype(np.float32)
            v = s * q
        return v.reshape(rows, self.cols).astype(np.float32, copy=False)

    def take_rows(self, index: np.ndarray) -> QuantBlocks:
        """The same blocks with rows reordered/selected: new row i is old row index[i]."""
        index = np.asarray(index)
        return QuantBlocks(
            codes=np.ascontiguousarray(self.codes[index]),
            scales=np.ascontiguousarray(self.scales[index]),
            mins=None if self.mins is None else np.ascontiguousarray(self.mins[index]),
            zero_point=self.zero_point,
            bits=self.bits,
            block_size=self.block_size,
            qtype=self.qtype,
        )


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32 (little-endian fp16)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """[R, B, 16] packed bytes -> [R, B, 32] codes: low nibbles are values 0..15, high 16..31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """[R, B, 4] bytes of a little-endian uint32 -> [R, B, 32] bits (bit j = value j)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte packed 6-bit scales and mins -> ([..., 8], [..., 8]) uint8."""
    d = sc[..., 0:4]
    m = sc[..., 4:8]
    md = sc[..., 8:12]
    scale = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scale, mn


def _q4_0(b: np.ndarray) -> tuple:
    d = _f16(b[..., 0:2])
    codes = _nibbles_32(b[..., 2:18])
    return codes, d, None, 8, 4, 32


def _q4_1(b: np.ndarray) -> tuple:
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    codes = _nibbles_32(b[..., 4:20])
    return codes, d, -m, None, 4, 32


def _q5_0(b: np.ndarray) -> tuple:
    d = _f16(b[..., 0:2])
    qh = _high_bits_32(b[..., 2:6])
    codes = _nibbles_32(b[..., 6:22]) | (qh << np.uint8(4))
    return codes, d, None, 16, 8, 32


def _q5_1(b: np.ndarray) -> tuple:
    d = _f16(b[..., 0:2])
    m = _f16(b[..., 2:4])
    qh = _high_bits_32(b[..., 4:8])
    codes = _nibbles_32(b[..., 8:24]) | (qh << np.uint8(4))
    return codes, d, -m, None, 8, 32


def _q8_0(b: np.ndarray) -> tuple:
    d = _f16(b[..., 0:2])
    codes = np.ascontiguousarray(b[..., 2:34]) ^ np.uint8(0x80)  # int8 q -> uint8 q + 128
    return codes, d, None, 128, 8, 32


def _q4_k(b: np.ndarray) -> tuple:
    r, nsb = b.shape[:2]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    qs = b[..., 16:144].reshape(r, nsb, 4, 32)  # 4 chunks of 32 bytes -> sub-blocks 2c (low), 2c+1 (high)
    codes = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=3).reshape(r, nsb, 256)
    scales = (d * sc.astype(np.float32)).reshape(r, nsb * 8)
    mins = (dmin * mn.astype(np.float32)).reshape(r, nsb * 8)
    return codes, scales, mins, None, 4, 32


def _q5_k(b: np.ndarray) -> tuple:
    r, nsb = b.shape[:2]
    d = _f16(b[..., 0:2])[..., None]
    dmin = _f16(b[..., 2:4])[..., None]
    sc, mn = _k_scale_min(b[..., 4:16])
    qh = b[..., 16:48]  # bit j of byte i -> sub-block j, value i
    qs = b[..., 48:176].reshape(r, nsb, 4, 32)
    ql = np.stack([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=3).reshape(r, nsb, 8, 32)
    hb = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)  # [r, nsb, 8, 32]
    codes = (ql | (hb << np.uint8(4))).reshape(r, nsb, 256)
    scales = (d * sc.astype(np.float32)).reshape(r, nsb * 8)
    mins = (dmin * mn.astype(np.float32)).reshape(r, nsb * 8)
    return codes, scales, mins, None, 8, 32


def _q6_k(b: np.ndarray) -> tuple:
    r, nsb = b.shape[:2]
    ql = b[..., 0:128].reshape(r, nsb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(r, nsb, 8, 32)
    qh = b[..., 128:192].reshape(r, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    qh = (qh & np.uint8(0x03)).reshape(r, nsb, 8, 32)
    codes = (ql | (qh << np.uint8(4))).reshape(r, nsb, 256)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # [r, nsb, 16]
    d = _f16(b[..., 208:210])[..., None]
    scales = (d * sc).reshape(r, nsb * 16)
    return codes, scales, None, 32, 8, 16


_DECODERS = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}

#: GGUF block types this module decodes exactly.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DECODERS)


def _as_qtype(qtype: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        return GGMLQuantizationType[qtype]
    return GGMLQuantizationType(int(qtype))


def decode_blocks(
    raw: np.ndarray,
    qtype: GGMLQuantizationType | int | str,
    shape: tuple[int, int] | None = None,
    *,
    name: str = "<tensor>",
) -> QuantBlocks:
    """Decode raw GGUF block bytes of a 2-D tensor.

    ``raw`` is uint8 with the bytes of each row contiguous ([rows, bytes_per_row] as
    GGUFReader gives it, or flat with ``shape`` = (rows, cols)). ``shape`` is numpy order
    (rows = output features, cols = input features), the reverse of GGUF's ne[].
    """
    qt = _as_qtype(qtype)
    decoder = _DECODERS.get(qt)
    if decoder is None:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedQuantType(
            f"GGUF tensor {name!r} has type {qt.name}, which has no exact MatMulNBits mapping "
            f"(supported: {supported})"
        )
    blk, type_size = GGML_QUANT_SIZES[qt]
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if shape is None:
        if raw.ndim != 2:
            raise ValueError(f"{name}: give shape for a {raw.ndim}-D byte array")
        rows, nbytes = raw.shape
        if nbytes % type_size:
            raise ValueError(f"{name}: {nbytes} bytes per row is not a multiple of {qt.name}'s {type_size}")
        cols = nbytes // type_size * blk
    else:
        rows, cols = (int(x) for x in shape)
        if cols % blk:
            raise ValueError(f"{name}: {cols} columns is not a multiple of {qt.name}'s block of {blk}")
    nsb = cols // blk
    if raw.size != rows * nsb * type_size:
        raise ValueError(f"{name}: {raw.size} bytes, expected {rows * nsb * type_size} for {qt.name} {rows}x{cols}")
    b = np.ascontiguousarray(raw).reshape(rows, nsb, type_size)
    codes, scales, mins, zp, bits, bs = decoder(b)
    n_blocks = cols // bs
    return QuantBlocks(
        codes=np.ascontiguousarray(codes.reshape(rows, cols), dtype=np.uint8),
        scales=np.ascontiguousarray(scales.reshape(rows, n_blocks), dtype=np.float32),
        mins=None if mins is None else np.ascontiguousarray(mins.reshape(rows, n_blocks), dtype=np.float32),
        zero_point=zp,
        bits=bits,
        block_size=bs,
        qtype=qt.name,
    )


def decode_reader_tensor(tensor) -> QuantBlocks:
    """Decode a ``gguf.GGUFReader`` tensor (a 2-D weight: GGUF ne = [cols, rows])."""
    ne = [int(x) for x in tensor.shape]
    if len(ne) != 2:
        raise ValueError(f"GGUF tensor {tensor.name!r} has {len(ne)} dimensions, expected a 2-D weight")
    cols, rows = ne
    return decode_blocks(tensor.data, tensor.tensor_type, (rows, cols), name=tensor.name)


def llama_unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row index that undoes llama.cpp's q/k ``permute`` for rotary (as transformers does).

    ``hf_weight == gguf_weight[index]``. llama.cpp's converter stored
    ``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)``; for attn_k pass the
    number of KV heads.
    """
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    half = rows // n_head // 2
    # GGUF row g = (h, i, j) with j in {0,1}, i < half; it holds HF row (h, j, i).
    gguf_of_hf = np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)
    return gguf_of_hf


def permute_rows(blocks: QuantBlocks, index: np.ndarray) -> QuantBlocks:
    """``blocks`` with rows reordered: new row i is old row ``index[i]``."""
    return blocks.take_rows(index)


# transformers module-name prefixes that differ from the plain causal-LM layout the gguf name map knows.
_PREFIX_REWRITES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head", "lm_head"),
    ("transformer.", "model."),
)


class GGUFFile:
    """A GGUF file's tensors, found by the transformers module that holds them (gguf-py's name map)."""

    def __init__(self, path: Path):
        self.reader = gguf.GGUFReader(str(path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self._str("general.architecture")
        self.n_layers = self._int(f"{self.arch}.block_count", 0)
        self.n_head = self._int(f"{self.arch}.attention.head_count", 0)
        self.n_head_kv = self._int(f"{self.arch}.attention.head_count_kv", self.n_head)
        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(self.arch)
        self.name_map = gguf.get_tensor_name_map(arch_enum, self.n_layers) if arch_enum is not None else None

    def _field(self, key):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def _str(self, key) -> str:
        v = self._field(key)
        return v if isinstance(v, str) else ""

    def _int(self, key, default: int) -> int:
        v = self._field(key)
        if isinstance(v, list):  # per-layer arrays: take the first
            v = v[0] if v else None
        return int(v) if v is not None else default

    def tensor_for(self, module: str) -> str | None:
        """GGUF weight name for a transformers module name (e.g. model.layers.0.mlp.up_proj)."""
        if self.name_map is None:
            return None
        candidates = [module]
        for old, new in _PREFIX_REWRITES:
            if module.startswith(old):
                candidates.append(new + module[len(old):])
        for cand in candidates:
            base = self.name_map.get_name(cand)
            if base is None:
                continue
            name = base + ".weight"
            if name in self.tensors:
                return name
            if base == "output" and "token_embd.weight" in self.tensors:
                return "token_embd.weight"  # tied embeddings: llama.cpp uses token_embd as output
        return None

    def row_orders(self, gguf_name: str, rows: int) -> list[tuple[str, np.ndarray | None]]:
        """Row orders to try, most likely first: identity and llama.cpp's q/k un-permutation."""
        parts = gguf_name.split(".")
        kind = parts[-2] if len(parts) >= 2 else ""
        heads = {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(kind, 0)
        orders: list[tuple[str, np.ndarray | None]] = [("identity", None)]
        if heads and rows % (2 * heads) == 0:
            un = ("unpermuted", llama_unpermute_rows(rows, heads))
            orders = [un, orders[0]] if self.arch == "llama" else [orders[0], un]
        return orders
