"""Rewrite an fp32 ONNX decoder's weight MatMuls into MatMulNBits from the GGUF's own blocks.

The fp32 export (GGUF -> transformers -> Optimum) holds the dequantized GGUF weights. Instead of
re-quantizing those values (which adds a second rounding on top of llama.cpp's), this pass takes
each weight's codes and scales straight from the GGUF blocks (:mod:`calm_cli.fleet.gguf_blocks`)
and lays them out for onnxruntime's ``com.microsoft.MatMulNBits``. Every rewritten weight is first
checked by value: the dequantized GGUF tensor, after llama.cpp's q/k row permutation is undone,
transposed, must equal the fp32 initializer (max abs diff <= 1e-6 of its max abs value);
otherwise :class:`GGUFWeightMismatch` is raised.

MatMulNBits computes Y = A @ dequant(B)^T with dequant(B)[n, k] = scale[n, b] * (q[n, k] - zp[n, b]),
b = k // block_size. Mapping per GGUF type (all exact):

* Q4_0: bits 4, block 32, codes q, no zero-point input (the default zp for 4 bits is 8).
* Q8_0 / Q5_0 / Q6_K: bits 8, codes shifted to q - zp + 128 (q+128, q+112, q+96), no zero-point
  input (the default zp for 8 bits is 128); Q6_K uses block 16 (its 16-value sub-blocks).
* Q4_1 / Q4_K (value = scale*q - min): bits 4, block 32, per-block uint8 zero point
  z = round(min/scale) (clipped to 0..15), then ``Y -= blocksum(A) @ (min - scale*z)^T``, where
  blocksum(A)[..., b] sums A over block b (a Reshape and a ReduceSum, shared by the MatMuls that
  read the same A, then a small MatMul and a Sub). scale*(q - z) - (min - scale*z) is the GGUF
  value exactly; the integer z keeps the int8-activation error of accuracy_level 4 proportional
  to the weights (with z = 0 it grows with scale*q, which measured 5x worse in KL on SmolLM2).
  A float zero point (min/scale) would be exact without the correction, but onnxruntime's CPU
  kernel takes a ~100x slower path for it; a rounded zero point without correction is not exact.
* Q5_1 / Q5_K: as Q4_1 / Q4_K but bits 8, codes q - z + 128 and no zero-point input.

Kernel support as measured/read for onnxruntime 1.31.1:

* CPU (MLAS): bits 4 and 8, block 16 and 32 all run. accuracy_level 4 (int8 activations) is the
  fast path for both widths; at accuracy_level 0 the 8-bit kernel falls back to a path ~50x
  slower (measured 20-40 ms for one 896x4864 product against ~0.4 ms at level 4). With 8 bits an
  explicit zero-point input was also slower at block 16 than none, hence the shift to zp 128.
* CUDA (read in contrib_ops/cuda/quantization/matmul_nbits.cc and matmul_{4,8}bits*.cu, then run
  on an H100 with onnxruntime-gpu 1.31.1): bits 4 and 8, block 16 and 32, with and without uint8
  zero points, fp32 activations: all run on the CUDA EP, and so does a whole rewritten graph
  (min correction included) with CPU fallback disabled. M = 1 (and M <= 5 for 8 bits) uses GEMV
  kernels (rel. error 1e-7); larger M dequantizes to a scratch matrix and calls cuBLAS (3e-4 with
  the EP's default TF32). Zero points may also be of the scale type. accuracy_level is ignored
  there (identical results at 0 and 4). The CUTLASS fpA_intB path serves fp16/bf16 activations
  only, so it does not apply to these fp32 graphs.

Needs onnx, numpy and gguf (export time only; serving never imports this module).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from calm_cli.errors import CalmError
from calm_cli.fleet.gguf_blocks import GGUFFile, QuantBlocks, UnsupportedQuantType, decode_reader_tensor
from calm_cli.fleet.graph import names
from calm_cli.fleet.graph.builder import MS_DOMAIN, GraphBuilder, import_ms_opset, opset_version

__all__ = ["GGUFWeightMismatch", "Report", "quantize_from_gguf", "to_matmulnbits"]

VALUE_RTOL = 1e-6
_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


class GGUFWeightMismatch(CalmError):
    """An fp32 initializer does not equal the GGUF tensor it was matched to."""


@dataclass
class Report:
    """What :func:`quantize_from_gguf` did."""

    per_type: dict[str, int] = field(default_factory=dict)  # GGUF type -> MatMuls rewritten
    mapping: dict[str, str] = field(default_factory=dict)  # ONNX node -> GGUF tensor
    unpermuted: list[str] = field(default_factory=list)  # nodes whose GGUF rows were un-permuted
    min_corrected: int = 0  # MatMuls with the blocksum(A) @ mins^T correction
    left_fp32: dict[str, str] = field(default_factory=dict)  # ONNX node -> why it stayed fp32
    weight_bytes_before: int = 0  # fp32 bytes of the replaced weights
    weight_bytes_after: int = 0  # bytes of packed codes + scales + zero points + mins
    file_bytes_before: int = 0  # fp32 model on disk (graph + external data)
    file_bytes_after: int = 0  # rewritten model on disk

    @property
    def rewritten(self) -> int:
        return sum(self.per_type.values())

    def summary(self) -> str:
        types = ", ".join(f"{k}: {v}" for k, v in sorted(self.per_type.items()))
        lines = [
            f"MatMulNBits from GGUF blocks: {self.rewritten} MatMuls ({types}); "
            f"{self.min_corrected} with min correction; {len(self.unpermuted)} un-permuted q/k",
            f"weights {self.weight_bytes_before / 1e6:.1f} MB fp32 -> {self.weight_bytes_after / 1e6:.1f} MB; "
            f"file {self.file_bytes_before / 1e6:.1f} MB -> {self.file_bytes_after / 1e6:.1f} MB",
        ]
        for node, why in self.left_fp32.items():
            lines.append(f"left fp32: {node}: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# packing


def _pack_nibbles(a: np.ndarray) -> np.ndarray:
    """[..., 2m] values < 16 -> [..., m] bytes, element 2i in the low nibble."""
    return (a[..., 0::2] | (a[..., 1::2] << np.uint8(4))).astype(np.uint8)


@dataclass
class NBitsWeight:
    """MatMulNBits operands for one weight (N = qb.rows, K = qb.cols)."""

    K: int
    N: int
    bits: int
    block_size: int
    B: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 packed, or None for the default (8 / 128)
    mins_t: np.ndarray | None  # float32 [n_blocks, N] for Y -= blocksum(A) @ mins_t

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.B, self.scales, self.zero_points, self.mins_t) if a is not None)


def to_matmulnbits(qb: QuantBlocks) -> NBitsWeight:
    """Lay out GGUF blocks as MatMulNBits B / scales / zero_points (+ mins for the correction)."""
    N, K, bs, nb = qb.rows, qb.cols, qb.block_size, qb.n_blocks
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got {bs}")
    if qb.bits not in (4, 8):
        raise ValueError(f"unsupported MatMulNBits width {qb.bits}")
    qmax = (1 << qb.bits) - 1
    codes = qb.codes
    mins = qb.mins
    if mins is not None:
        # value = s*q - M = s*(q - z) - (M - s*z) for any integer z. Take z = round(M/s) per block so
        # that s*(q - z) is close to the real weight: the int8 activation rounding error of the
        # accuracy_level 4 kernel then scales with the weight itself rather than with s*q, which
        # for Q4_1/Q4_K is up to twice as large. The remainder M - s*z (at most s/2 when z is not
        # clipped) goes to the exact fp32 correction term.
        s = qb.scales.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(s != 0, np.rint(mins.astype(np.float64) / s), 0.0)
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
        if qb.bits == 4:  # stored as a nibble
            z = np.clip(z, 0, qmax)
        else:  # folded into the codes: q - z + 128 must stay in 0..255 within each block
            blocks = codes.reshape(N, nb, bs)
            z = np.clip(z, blocks.max(axis=-1).astype(np.float64) - 127, blocks.min(axis=-1).astype(np.float64) + 128)
        z = z.astype(np.int16)  # [N, nb]
        mins = mins - qb.scales * z.astype(np.float32)
    else:
        z = np.full((N, nb), qb.zero_point, dtype=np.int16)
    zero_points = None
    if qb.bits == 8:
        # The default 8-bit zero point is 128 and an explicit one is slower on CPU: store
        # q - z + 128 instead (always in 0..255 for the GGUF 5-bit and int8 codes) and give no zp input.
        shifted = codes.reshape(N, nb, bs).astype(np.int16) - z[..., None] + 128
        if shifted.min(initial=0) < 0 or shifted.max(initial=0) > 255:
            raise ValueError(f"{qb.qtype}: 8-bit codes do not fit after the zero-point shift")
        B = shifted.astype(np.uint8)
    else:
        B = _pack_nibbles(codes.reshape(N, nb, bs))
        if not np.all(z == 8):  # 8 is the default for 4 bits
            zrow = np.zeros((N, nb + (nb & 1)), dtype=np.uint8)
            zrow[:, :nb] = z.astype(np.uint8)
            zero_points = _pack_nibbles(zrow).reshape(-1)
    return NBitsWeight(
        K=K,
        N=N,
        bits=qb.bits,
        block_size=bs,
        B=np.ascontiguousarray(B, dtype=np.uint8),
        scales=np.ascontiguousarray(qb.scales.reshape(-1), dtype=np.float32),
        zero_points=zero_points,
        mins_t=None if mins is None else np.ascontiguousarray(mins.T, dtype=np.float32),
    )


# ----------------------------------------------------------------------------------------------
# ONNX side


class _LeftFP32(Exception):
    """A weight MatMul this rewrite leaves in fp32: `reason` goes into the report under `node`."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(reason)
        self.node, self.reason = node, reason


@dataclass
class _Match:
    """A weight MatMul's GGUF tensor, verified by value, its blocks in the ONNX weight's row order."""

    label: str  # the MatMul node (its output where it has no name)
    gguf_name: str
    qtype: str
    blocks: QuantBlocks
    unpermuted: bool  # llama.cpp's q/k row permutation was undone


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Known tensor ranks from shape inference (empty where it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is an optimization only
        return {}
    ranks = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Tensors read inside subgraphs (If / Loop bodies): consumed, though no node of `graph` lists them."""
    found: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sg in subs:
                found.update(i for sn in sg.node for i in sn.input)
                found.update(_subgraph_inputs(sg))
    return found


def _file_bytes(path: Path) -> int:
    """Model file plus the external data files it references."""
    total = path.stat().st_size
    m = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                p = path.parent / loc
                if p.exists():
                    total += p.stat().st_size
    return total


class _Rewrite(GraphBuilder):
    """The new graph's nodes (kept and written) and new initializers, in order, for one fp32 model."""

    def __init__(self, model: onnx.ModelProto, ranks: dict[str, int], accuracy_level: int,
                 accuracy_level_8bit: int | None) -> None:
        super().__init__()
        graph = model.graph
        self.ranks = ranks
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.ai_opset = opset_version(model, "") or 13
        self.levels = {4: accuracy_level, 8: accuracy_level if accuracy_level_8bit is None else accuracy_level_8bit}
        self._i64: dict[tuple[int, ...], str] = {}
        self._blocksums: dict[tuple[str, int], str] = {}

    def weight_of(self, node: onnx.NodeProto) -> tuple[TensorProto, bool] | None:
        """A MatMul's constant B and whether a Transpose feeds it; None where B is no constant (or no MatMul)."""
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return None
        b_name = node.input[1]
        if b_name in self.inits:
            return self.inits[b_name], False
        tnode = self.producer.get(b_name)
        if tnode is None or tnode.op_type != "Transpose" or tnode.input[0] not in self.inits:
            return None  # activation x activation (attention scores): not a weight
        perm = next((list(a.ints) for a in tnode.attribute if a.name == "perm"), [1, 0])
        if perm != [1, 0]:
            raise _LeftFP32(node.name, f"B is a Transpose with perm {perm}")
        return self.inits[tnode.input[0]], True

    def matmulnbits(self, node: onnx.NodeProto, nw: NBitsWeight) -> bool:
        """Write the MatMulNBits that computes `node`'s output; True where it needs a min correction too."""
        base = (node.name.strip("/").replace("/", ".") or node.output[0]) + ".nbits"
        inputs = [node.input[0], self.const(base + ".B", nw.B), self.const(base + ".scales", nw.scales)]
        if nw.zero_points is not None:
            inputs.append(self.const(base + ".zero_points", nw.zero_points))
        attrs = dict(K=nw.K, N=nw.N, bits=nw.bits, block_size=nw.block_size)
        if self.levels[nw.bits]:
            attrs["accuracy_level"] = int(self.levels[nw.bits])
        prefix = node.name or base
        if nw.mins_t is None:
            self.add("MatMulNBits", inputs, [node.output[0]], names.nbits(prefix), MS_DOMAIN, **attrs)
            return False
        (raw,) = self.add("MatMulNBits", inputs, [prefix + "/nbits_raw"], names.nbits(prefix), MS_DOMAIN, **attrs)
        sums, keeps_rank = self._blocksum(node.input[0], nw.K, nw.block_size, prefix)
        mins = self.const(base + ".mins_t", nw.mins_t)
        (corr,) = self.add("MatMul", [sums, mins], [prefix + "/min_correction"], names.min_matmul(prefix))
        if not keeps_rank:  # generic path: blocksum came out [M, n_blocks]; match raw's shape
            (shape,) = self.add("Shape", [raw], [prefix + "/raw_shape"], prefix + "/RawShape")
            (corr,) = self.add("Reshape", [corr, shape], [corr + "_reshaped"], prefix + "/MinReshape")
        self.add("Sub", [raw, corr], [node.output[0]], prefix + "/MinSub")
        return True

    def _blocksum(self, a: str, K: int, bs: int, prefix: str) -> tuple[str, bool]:
        """blocksum(A) ([..., K // bs]), shared by the products that read A, and whether it keeps A's rank."""
        rank = self.ranks.get(a)
        if (a, bs) not in self._blocksums:
            nb = K // bs
            dims = (0,) * (rank - 1) + (nb, bs) if rank is not None and rank >= 1 else (-1, nb, bs)
            shape = self._const_i64(dims, "blocks_shape")
            axes = self._const_i64((-1,), "axes") if self.ai_opset >= 13 else None
            self._blocksums[(a, bs)] = self.block_sum(a, shape, prefix, axes=axes, block=bs,
                                                      outputs=(f"{prefix}/blocks_{bs}", f"{prefix}/blocksum_{bs}"))
        return self._blocksums[(a, bs)], rank is not None

    def _const_i64(self, values: tuple[int, ...], hint: str) -> str:
        """One int64 initializer per distinct value (the shapes and axes of the block sums)."""
        if values not in self._i64:
            self._i64[values] = self.const(f"calm_int4.{hint}.{len(self._i64)}", np.array(values, dtype=np.int64))
        return self._i64[values]


def _load(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model with its weights, and its tensor ranks (inferred before the weights are in: shape inference
    serializes the model, which protobuf caps at 2 GB)."""
    model = onnx.load(str(path), load_external_data=False)
    ranks = _ranks(model)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model, ranks


def _match(gg: GGUFFile, node: onnx.NodeProto, w_init: TensorProto, transposed: bool) -> _Match:
    """The GGUF tensor of a weight MatMul, checked by shape and value.

    Raises :class:`_LeftFP32` where there is no block-quantized GGUF weight for it and
    :class:`GGUFWeightMismatch` where there is one that differs.
    """
    label = node.name or node.output[0]
    if len(w_init.dims) != 2 or w_init.data_type not in (TensorProto.FLOAT,):
        raise _LeftFP32(label, f"B {w_init.name} is not a 2-D float32 weight")
    W = numpy_helper.to_array(w_init)
    W = W.T if transposed else W  # [K, N]
    K, N = W.shape
    module = names.module_of(node.name)
    gname = gg.tensor_for(module) if module else None
    if gname is None:
        raise _LeftFP32(label, f"no GGUF weight for module {module!r} (arch {gg.arch!r})")
    gt = gg.tensors[gname]
    qname = gt.tensor_type.name
    if qname in _FLOAT_TYPES:
        raise _LeftFP32(label, f"GGUF tensor {gname} is {qname}, not block-quantized")
    ne = [int(x) for x in gt.shape]
    if len(ne) != 2 or (ne[1], ne[0]) != (N, K):
        raise GGUFWeightMismatch(
            f"{label}: fp32 weight is [N={N}, K={K}] but GGUF {gname} is {list(reversed(ne))} ({qname})"
        )
    try:
        qb = decode_reader_tensor(gt)
    except UnsupportedQuantType as e:
        raise _LeftFP32(label, str(e)) from None
    order_name, qb = _row_order(gg, label, w_init.name, gname, qb, W.T)
    return _Match(label, gname, qname, qb, unpermuted=order_name != "identity")


def _row_order(gg: GGUFFile, label: str, w_name: str, gname: str, qb: QuantBlocks,
               Wt: np.ndarray) -> tuple[str, QuantBlocks]:
    """The blocks in the row order whose dequantized values equal Wt ([N, K], the HF/ONNX row order).

    Tries llama.cpp's q/k row order where it applies; raises :class:`GGUFWeightMismatch` when none matches.
    """
    scale = float(np.abs(Wt).max()) or 1.0
    tried = []
    for order_name, index in gg.row_orders(gname, Wt.shape[0]):
        cand = qb if index is None else qb.take_rows(index)
        diff = float(np.abs(cand.dequantize() - Wt).max())
        tried.append(f"{order_name}: max diff {diff:.3g}")
        if diff <= VALUE_RTOL * scale:
            return order_name, cand
    raise GGUFWeightMismatch(
        f"{label}: fp32 weight {w_name} does not equal GGUF {gname} ({qb.qtype}) "
        f"dequantized (max |w| {scale:.3g}; {'; '.join(tried)})"
    )


def _rewrite_node(rw: _Rewrite, gg: GGUFFile, node: onnx.NodeProto, report: Report) -> None:
    """Pass `node` to the new graph: as MatMulNBits where it is a GGUF-backed weight MatMul, else as it is."""
    try:
        weight = rw.weight_of(node)
        match = None if weight is None else _match(gg, node, *weight)
    except _LeftFP32 as left:
        report.left_fp32[left.node] = left.reason
        match = None
    if match is None:
        rw.nodes.append(node)
        return
    if match.unpermuted:
        report.unpermuted.append(match.label)
    nw = to_matmulnbits(match.blocks)
    if rw.matmulnbits(node, nw):
        report.min_corrected += 1
    report.per_type[match.qtype] = report.per_type.get(match.qtype, 0) + 1
    report.mapping[match.label] = match.gguf_name
    report.weight_bytes_before += nw.K * nw.N * 4
    report.weight_bytes_after += nw.nbytes


def _prune(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], new_initializers: list[TensorProto]) -> None:
    """Put the rewritten nodes and new initializers in; drop the Transposes and initializers (and their graph
    inputs) nobody consumes any more."""
    initializers = {t.name for t in graph.initializer}
    in_subgraphs = _subgraph_inputs(graph)

    def consumers(nodes: list[onnx.NodeProto]) -> Counter:
        c = Counter(i for n in nodes for i in n.input)
        c.update(o.name for o in graph.output)
        c.update(in_subgraphs)
        return c

    used = consumers(nodes)
    kept_nodes = [n for n in nodes if not (n.op_type == "Transpose" and all(used[o] == 0 for o in n.output)
                                           and n.input[0] in initializers)]
    used = consumers(kept_nodes)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    keep = [t for t in graph.initializer if used[t.name] > 0]
    dropped = initializers - {t.name for t in keep}
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(new_initializers)
    if dropped:
        kept_inputs = [i for i in graph.input if i.name not in dropped]
        del graph.input[:]
        graph.input.extend(kept_inputs)


def _save(model: onnx.ModelProto, out_onnx: Path) -> None:
    """Save with every tensor over 1 KB in one external-data file beside the model."""
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    data_name = out_onnx.name + ".data"
    data_path = out_onnx.parent / data_name
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing external-data file
    onnx.save_model(
        model,
        str(out_onnx),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )


def quantize_from_gguf(
    fp32_onnx: Path,
    gguf_path: Path,
    out_onnx: Path,
    *,
    accuracy_level: int = 4,
    accuracy_level_8bit: int | None = None,
) -> Report:
    """Rewrite every GGUF-backed weight MatMul of ``fp32_onnx`` into MatMulNBits; save to ``out_onnx``.

    A MatMul is rewritten when its B is a 2-D float initializer, directly or through a
    Transpose(perm=[1, 0]), and its node name maps to a block-quantized GGUF weight of the same
    shape. The replaced fp32 initializers (and orphaned Transposes) are removed; tensors still
    used elsewhere (a tied embedding's Gather) stay. Saved with external data.
    Raises :class:`GGUFWeightMismatch` when a matched weight differs from the GGUF tensor.

    ``accuracy_level`` is MatMulNBits' attribute (4: int8 activations, the fast CPU path; 0: fp32
    activations, exact up to float rounding). ``accuracy_level_8bit`` overrides it for the 8-bit
    weights (Q5_0/Q5_1/Q5_K/Q8_0/Q6_K), whose CPU kernel at level 0 is ~50x slower than at 4:
    ``accuracy_level=0, accuracy_level_8bit=4`` keeps the 4-bit products exact at moderate cost.
    """
    fp32_onnx, gguf_path, out_onnx = Path(fp32_onnx), Path(gguf_path), Path(out_onnx)
    report = Report(file_bytes_before=_file_bytes(fp32_onnx))
    gg = GGUFFile(gguf_path)
    model, ranks = _load(fp32_onnx)
    rw = _Rewrite(model, ranks, accuracy_level, accuracy_level_8bit)
    for node in model.graph.node:
        _rewrite_node(rw, gg, node, report)
    _prune(model.graph, rw.nodes, rw.initializers)
    if report.rewritten:
        import_ms_opset(model)
    _save(model, out_onnx)
    report.file_bytes_after = _file_bytes(out_onnx)
    return report


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    if len(sys.argv) != 4:
        sys.exit("usage: python -m calm_cli.fleet.graph.int4 FP32.onnx MODEL.gguf OUT.onnx")
    print(quantize_from_gguf(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])).summary())
