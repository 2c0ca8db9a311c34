"""Random but valid GGUF quantized blocks, shared by the block, int4 and fused-graph tests."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

# Byte offsets of the fp16 fields (d, and m/dmin) inside one block of each type.
FP16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int, scale: float = 0.01) -> np.ndarray:
    """Raw blocks [rows, bytes per row]: random codes, small finite fp16 scales and mins (the K-quants'
    super-block scales non-negative, as llama.cpp writes them)."""
    block, size = GGML_QUANT_SIZES[qtype]
    nb = cols // block
    raw = rng.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for i, off in enumerate(FP16_FIELDS[qtype]):
        values = rng.standard_normal((rows, nb)) * scale
        if i == 0 and qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            values = np.abs(values)
        raw[..., off:off + 2] = values.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * size)
