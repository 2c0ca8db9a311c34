"""Rebuild Optimum's decoder graph as a compact one around onnxruntime's GroupQueryAttention (CPU serving).

Optimum's text-generation-with-past graph carries thousands of shape and mask nodes per step, takes the whole
past KV cache in and returns a longer copy each step. This module reads the weights back out of that graph
(fp32 MatMuls, or the MatMulNBits + min correction of :mod:`calm_cli.fleet.graph.int4`, biases, norm scales, the
embedding and the rotary tables it computes) and writes a new graph with the same arithmetic in few nodes:

* SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization for the RMS norms and residual adds;
* q/k/v and gate/up MatMulNBits concatenated into one product each where their formats agree (exact: every
  output column is computed as before); hidden states kept 2-D so that each min correction is one Gemm
  (y = raw - blocksum(x) @ mins) on block sums shared by the products that read the same x;
* GroupQueryAttention with the rotary embedding inside (cos/sin tables evaluated from the source graph's own
  rotary subgraph), the KV cache in caller-owned buffers of a fixed capacity that the kernel updates in
  place (``past_key`` and ``present_key`` bound to the same memory), ``seqlens_k`` / ``total_sequence_length``
  giving each row's length; Gemma 3's sliding-window layers through ``local_window_size`` and its q/k norms;
* logits only for the positions the caller lists (``logits_index``: flat indices into batch x sequence), so
  a prompt does not pay the vocabulary projection for every position.

Graph interface: inputs ``input_ids`` [B, S] int64, ``seqlens_k`` [B] int32 (total length - 1 per row),
``total_sequence_length`` [] int32 (max total length), ``logits_index`` [L] int64, and per layer
``past_key_values.{i}.key|value`` [B, kv_heads, capacity, head_dim]; outputs ``logits`` [L, vocab] and
``present.{i}.key|value`` (the same buffers). Prompts in a batch are right-padded.

Weights the new graph uses unchanged stay where the plain graph's external data has them (the fused graph's
initializers point into ``model.onnx.data``); only new tensors (concatenations, rotary tables) go to
``model.fused.onnx.data``. Supported: llama, qwen2 (q/k/v biases) and gemma3_text; anything else raises
:class:`Unsupported` and the plain graph stays the one served. onnxruntime's CUDA GroupQueryAttention has no
float32 kernel, so this graph is for the CPU provider; CUDA serves the plain graph.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calm_cli.engine.session import FUSED_GRAPH
from calm_cli.errors import CalmError
from calm_cli.fleet.graph import names
from calm_cli.fleet.graph.builder import MS_DOMAIN, GraphBuilder, new_model, value_info

__all__ = ["Unsupported", "build", "fuse_export"]

OPSET = 21
_ARCHS = ("llama", "qwen2", "gemma3_text")


class Unsupported(CalmError):
    """A model this rewrite does not handle; the plain graph serves it."""


@dataclass
class Linear:
    """One projection y = x @ W (+ bias) as the source graph computes it: fp32 MatMul or MatMulNBits."""

    K: int
    N: int
    weight: np.ndarray | None = None  # fp32 [K, N] (plain MatMul)
    B: np.ndarray | None = None  # MatMulNBits uint8 [N, blocks, blob]
    scales: np.ndarray | None = None  # [N, blocks]
    zero_points: np.ndarray | None = None  # packed uint8 [N, zp_cols]
    bits: int = 0
    block_size: int = 0
    accuracy_level: int = 0
    mins_t: np.ndarray | None = None  # [blocks, N]: y -= blocksum(x) @ mins_t (the int4 min correction)
    bias: np.ndarray | None = None  # [N]

    @property
    def fmt(self) -> tuple:
        return ("fp32",) if self.weight is not None else ("nbits", self.K, self.bits, self.block_size,
                                                          self.accuracy_level)


def _default_zero_points(lin: Linear) -> np.ndarray:
    """The packed zero points MatMulNBits assumes when none are given (2^(bits-1)), for concatenation."""
    blocks = lin.B.shape[1]
    if lin.bits == 4:
        return np.full((lin.N, (blocks + 1) // 2), 0x88, dtype=np.uint8)
    return np.full((lin.N, blocks), 1 << (lin.bits - 1), dtype=np.uint8)


def concat(parts: list[Linear]) -> Linear | None:
    """The MatMulNBits projections side by side along N as one, or None where their formats differ.

    fp32 projections are left apart: the fused graph then points at every fp32 weight where the plain graph
    keeps it, rather than holding a second copy of a multi-GB export.
    """
    first = parts[0]
    if len(parts) == 1:
        return first
    if len({p.fmt for p in parts}) != 1 or first.weight is not None:
        return None
    if first.bits not in (4, 8) and any(p.zero_points is not None for p in parts):
        return None
    blocks = first.B.shape[1]
    merged = replace(first, N=sum(p.N for p in parts), B=np.concatenate([p.B for p in parts]),
                     scales=np.concatenate([p.scales for p in parts]))
    if any(p.zero_points is not None for p in parts):
        merged.zero_points = np.concatenate(
            [p.zero_points if p.zero_points is not None else _default_zero_points(p) for p in parts])
    if any(p.mins_t is not None for p in parts):
        merged.mins_t = np.concatenate(
            [p.mins_t if p.mins_t is not None else np.zeros((blocks, p.N), np.float32) for p in parts], axis=1)
    if any(p.bias is not None for p in parts):
        merged.bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.N, np.float32) for p in parts])
    return merged


class _Source:
    """Optimum's graph, indexed so that weights can be read back out by module name.

    Weights in external data are memory-mapped, not loaded: a multi-GB fp32 graph costs address space, not
    memory, and a weight the new graph keeps as it is can point at the same bytes (see `stored`).
    """

    def __init__(self, path: Path):
        self.directory = path.parent
        self.model = onnx.load(str(path), load_external_data=False)
        # (address, bytes) -> (file, offset, the mapping itself: kept open so that no address is reused)
        self._stored: dict[tuple[int, int], tuple[str, int, np.memmap]] = {}
        graph = self.model.graph
        self.nodes = {n.name: n for n in graph.node}
        self.order = {n.name: i for i, n in enumerate(graph.node)}
        self.tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.tensors[n.output[0]] = n.attribute[0].t
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def array(self, name: str) -> np.ndarray | None:
        """A constant's value (through the Identity nodes the exporter leaves for deduplicated weights)."""
        while name not in self.tensors and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        t = self.tensors.get(name)
        if t is None:
            return None
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        where = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        values = np.memmap(self.directory / where["location"], dtype=dtype, mode="r",
                           offset=int(where.get("offset", 0)), shape=tuple(t.dims))
        self._stored[(values.ctypes.data, values.nbytes)] = (where["location"], int(where.get("offset", 0)), values)
        return values

    def stored(self, values: np.ndarray) -> tuple[str, int] | None:
        """(file, offset) of values that are a whole external tensor of the source, as laid out there."""
        found = self._stored.get((values.ctypes.data, values.nbytes)) if values.flags.c_contiguous else None
        return None if found is None else found[:2]

    def node(self, name: str) -> onnx.NodeProto:
        if name not in self.nodes:
            raise Unsupported(f"the graph has no node {name!r}")
        return self.nodes[name]

    def under(self, prefix: str, op_type: str) -> list[onnx.NodeProto]:
        return [n for n in self.model.graph.node if n.name.startswith(prefix + "/") and n.op_type == op_type]

    def const_input(self, node: onnx.NodeProto) -> np.ndarray | None:
        """The one constant operand of a binary node, if it has one."""
        found = [a for a in (self.array(i) for i in node.input) if a is not None]
        return found[0] if len(found) == 1 else None

    def linear(self, prefix: str) -> Linear:
        """The projection computed under node prefix (e.g. '/model/layers.0/self_attn/q_proj')."""
        nbits = self.nodes.get(names.nbits(names.matmul(prefix)))
        if nbits is not None:
            a = {x.name: helper.get_attribute_value(x) for x in nbits.attribute}
            if len(nbits.input) > 4 and any(nbits.input[4:]):
                raise Unsupported(f"{nbits.name}: g_idx or bias inputs")
            N = int(a["N"])
            zp = self.array(nbits.input[3]) if len(nbits.input) > 3 and nbits.input[3] else None
            if zp is not None and zp.dtype != np.uint8:
                raise Unsupported(f"{nbits.name}: unpacked zero points")
            lin = Linear(K=int(a["K"]), N=N, B=self.array(nbits.input[1]),
                         scales=self.array(nbits.input[2]).reshape(N, -1),
                         zero_points=None if zp is None else zp.reshape(N, -1), bits=int(a["bits"]),
                         block_size=int(a["block_size"]), accuracy_level=int(a.get("accuracy_level", 0)))
            mins = self.nodes.get(names.min_matmul(names.matmul(prefix)))
            if mins is not None:
                lin.mins_t = self.array(mins.input[1])
        else:
            node = self.node(names.matmul(prefix))
            w = self.array(node.input[1])
            if w is None:
                t = self.producer.get(node.input[1])
                perm = [list(x.ints) for x in t.attribute if x.name == "perm"] if t is not None else []
                if t is None or t.op_type != "Transpose" or perm not in ([], [[1, 0]]):
                    raise Unsupported(f"{node.name}: weight is not a constant")
                w = self.array(t.input[0])
                w = None if w is None else w.T
            if w is None or w.ndim != 2:
                raise Unsupported(f"{node.name}: weight is not a 2-D constant")
            lin = Linear(K=w.shape[0], N=w.shape[1], weight=np.ascontiguousarray(w, np.float32))
        add = self.nodes.get(prefix + "/Add")
        if add is not None:
            lin.bias = self.const_input(add)
            if lin.bias is None or lin.bias.shape != (lin.N,):
                raise Unsupported(f"{add.name}: not a bias of {lin.N}")
        return lin

    def norm(self, prefix: str) -> tuple[np.ndarray, float]:
        """An RMS norm's effective scale (Gemma's 1 + w already folded by the exporter) and epsilon."""
        scales = [w for w in (self.const_input(n) for n in self.under(prefix, "Mul")) if w is not None and w.ndim == 1]
        eps = self.const_input(self.node(prefix + "/Add"))
        if len(scales) != 1 or eps is None or eps.size != 1:
            raise Unsupported(f"{prefix}: not an RMS norm with one scale vector")
        return scales[0].astype(np.float32), float(eps.reshape(()))

    def _table_end(self, start: str, prefix: str) -> str:
        """Follow a rotary table through its scaling Mul and Casts to the tensor the layers read."""
        name = start
        while True:
            users = self.consumers.get(name, [])
            if len(users) != 1 or not users[0].name.startswith(prefix + "/"):
                return name
            user = users[0]
            if user.op_type == "Cast" or (user.op_type == "Mul" and self.const_input(user) is not None):
                name = user.output[0]
            else:
                return name

    @staticmethod
    def _prompt_feed(info: onnx.ValueInfoProto, positions: int) -> np.ndarray:
        """A graph input as for a first prompt of `positions` tokens: ids 0, mask 1, positions 0.., empty cache."""
        if info.name == "position_ids":
            return np.arange(positions, dtype=np.int64)[None, :]
        if info.name in ("input_ids", "attention_mask"):
            return np.full((1, positions), int(info.name == "attention_mask"), dtype=np.int64)
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
        if not info.name.startswith("past_key_values.") or len(dims) != 4:
            raise Unsupported(f"rotary tables depend on the input {info.name!r}")
        return np.zeros((1, dims[1], 0, dims[3]), dtype=np.float32)

    def rotary(self, prefix: str, positions: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [positions, rotary_dim / 2] exactly as the source graph computes them."""
        import onnxruntime as ort

        cos, sin = (self.under(prefix, op) for op in ("Cos", "Sin"))
        if len(cos) != 1 or len(sin) != 1:
            raise Unsupported(f"{prefix}: no single Cos/Sin pair")
        targets = [self._table_end(cos[0].output[0], prefix), self._table_end(sin[0].output[0], prefix)]
        needed, inputs, stack, seen = [], set(), list(targets), set()
        graph_inputs = {i.name: i for i in self.model.graph.input}
        while stack:
            name = stack.pop()
            if name in seen or not name:
                continue
            seen.add(name)
            if name in graph_inputs:
                inputs.add(name)
            elif name in self.producer:
                node = self.producer[name]
                if node.name not in {n.name for n in needed}:
                    needed.append(node)
                    stack.extend(node.input)
        needed.sort(key=lambda n: self.order[n.name])
        used = {i for n in needed for i in n.input}
        graph = helper.make_graph(
            needed, "rotary", [graph_inputs[name] for name in sorted(inputs)],
            [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in targets],
            [t for name, t in self.tensors.items() if name in used and name not in self.producer])
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        # Saved beside the source so that its weights stay references into the source's external data.
        with tempfile.NamedTemporaryFile(dir=self.directory, suffix=".rotary.onnx") as cone:
            onnx.save_model(model, cone.name)
            session = ort.InferenceSession(cone.name, providers=["CPUExecutionProvider"])
        cos_t, sin_t = session.run(None, {name: self._prompt_feed(graph_inputs[name], positions) for name in inputs})
        half = cos_t.shape[-1] // 2
        cos_t, sin_t = cos_t.reshape(positions, -1), sin_t.reshape(positions, -1)
        if not (np.array_equal(cos_t[:, :half], cos_t[:, half:]) and np.array_equal(sin_t[:, :half], sin_t[:, half:])):
            raise Unsupported(f"{prefix}: rotary tables are not two equal halves (interleaved rotary?)")
        return np.ascontiguousarray(cos_t[:, :half]), np.ascontiguousarray(sin_t[:, :half])


class _Builder(GraphBuilder):
    """Emits nodes and initializers of the new graph with unique names.

    Large initializers go straight to the external-data file as they are made (the whole model is never
    in memory at once); those the source holds unchanged in external data are referenced where they lie.
    """

    ALIGN = 4096  # page-aligned tensors can be memory-mapped by onnxruntime
    ONES_BYTES = 1 << 17  # largest 0/1 block-sum matrix worth a product (a quarter of a core's L2 here)

    def __init__(self, src: _Source, data: Path, file: BinaryIO) -> None:
        super().__init__()
        self.src, self.data, self.file = src, data, file
        self._blocksums: dict[tuple[str, int, int], str] = {}
        self._ones: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer: inline when small, else external (a reference into the source's data if unchanged)."""
        if value.nbytes < 1024:
            return super().const(name, np.array(value))
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape)
        stored = self.src.stored(value)
        if stored is not None and (self.src.directory / stored[0]).resolve().parent == self.data.resolve().parent:
            location, offset = stored
        else:
            offset = -self.file.tell() % self.ALIGN
            self.file.write(b"\0" * offset)
            location, offset = self.data.name, self.file.tell()
            self.file.write(np.ascontiguousarray(value).tobytes())
        proto.data_location = TensorProto.EXTERNAL
        for key, v in (("location", location), ("offset", str(offset)), ("length", str(value.nbytes))):
            proto.external_data.add(key=key, value=v)
        self.initializers.append(proto)
        return name

    def linear(self, lin: Linear, x: str, name: str) -> str:
        """x @ W (+ bias) for one (possibly concatenated) projection of a 2-D x [tokens, K]."""
        if lin.weight is not None:
            (y,) = self.op("MatMul", [x, self.const(name + ".weight", lin.weight)], name + "/MatMul")
            if lin.bias is not None:
                (y,) = self.op("Add", [y, self.const(name + ".bias", lin.bias.astype(np.float32))], name + "/Add")
            return y
        inputs = [x, self.const(name + ".B", lin.B), self.const(name + ".scales", lin.scales.reshape(-1)),
                  self.const(name + ".zero_points", lin.zero_points.reshape(-1)) if lin.zero_points is not None
                  else ""]
        if lin.bias is not None:
            inputs += ["", self.const(name + ".bias", lin.bias.astype(np.float32))]
        attrs = dict(K=lin.K, N=lin.N, bits=lin.bits, block_size=lin.block_size)
        if lin.accuracy_level:
            attrs["accuracy_level"] = lin.accuracy_level
        (y,) = self.op("MatMulNBits", inputs, name + "/MatMulNBits", domain=MS_DOMAIN, **attrs)
        if lin.mins_t is None:
            return y
        sums = self._blocksum(x, lin.K, lin.block_size, name)
        (y,) = self.op("Gemm", [sums, self.const(name + ".mins_t", lin.mins_t), y], name + "/MinGemm", alpha=-1.0)
        return y

    def _blocksum(self, x: str, K: int, block: int, name: str) -> str:
        """x summed over each block of `block` features ([tokens, K / block]), shared by products reading x.

        A product with a 0/1 matrix (one node) where that matrix is small; the Reshape and ReduceSum of
        :meth:`GraphBuilder.block_sum` where it would not stay in cache (large K with small blocks).
        """
        key = (x, K, block)
        if key in self._blocksums:
            return self._blocksums[key]
        if K * (K // block) * 4 <= self.ONES_BYTES:
            ones = f"blocksum_{K}_{block}"  # [K, K / block], one per shape for the whole graph
            if ones not in self._ones:
                self.const(ones, np.kron(np.eye(K // block, dtype=np.float32), np.ones((block, 1), np.float32)))
                self._ones.add(ones)
            self._blocksums[key] = self.op("MatMul", [x, ones], names.block_sum(name))[0]
        else:
            shape = self.const(f"{name}.blocks_shape", np.array([0, K // block, block], np.int64))
            axes = self.const(f"{name}.blocks_axis", np.array([-1], np.int64))
            self._blocksums[key] = self.block_sum(x, shape, name, axes=axes)
        return self._blocksums[key]


def build(src: _Source, config: dict, data: Path, file: BinaryIO) -> onnx.ModelProto:
    """The compact graph for one decoder, weights read from `src`, layout from its config.json.

    New initializers are written to `file`, the external-data file `data`, as the graph is built.
    """
    arch = config.get("model_type")
    if arch not in _ARCHS:
        raise Unsupported(f"architecture {arch!r} (supported: {', '.join(_ARCHS)})")
    if config.get("use_sliding_window") and arch != "gemma3_text":
        raise Unsupported(f"{arch} with a sliding window")
    gemma = arch == "gemma3_text"
    layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    positions = int(config["max_position_embeddings"])
    act = config.get("hidden_activation") or config.get("hidden_act")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise Unsupported(f"activation {act!r}")
    layer_types = config.get("layer_types") or ["full_attention"] * layers
    if gemma and "sliding_attention" in layer_types and not config.get("sliding_window"):
        raise Unsupported("sliding layers without a window size")
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        raise Unsupported("logit soft-capping")
    rope = config.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) in ("dynamic", "longrope"):
        # tables that depend on the sequence length cannot be evaluated once for every position
        raise Unsupported(f"rope scaling {rope.get('rope_type') or rope.get('type')!r}")

    b = _Builder(src, data, file)
    inputs = [value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              value_info("total_sequence_length", TensorProto.INT32, []),
              value_info("logits_index", TensorProto.INT64, ["selected"])]
    outputs = [value_info("logits", TensorProto.FLOAT, ["selected", "vocab"])]

    gather = src.node("/model/embed_tokens/Gather")
    # Hidden states are [tokens, hidden] throughout (2-D: the min corrections fold into one Gemm each);
    # attention alone sees [batch, sequence, features].
    (tokens,) = b.op("Reshape", ["input_ids", b.const("flat", np.array([-1], np.int64))], "embed/Flatten")
    (shape,) = b.op("Shape", ["input_ids"], "embed/Shape")
    (bsd,) = b.op("Concat", [shape, b.const("last", np.array([-1], np.int64))], "embed/AttentionShape", axis=0)
    (x,) = b.op("Gather", [b.const("embed_tokens", src.array(gather.input[0])), tokens], "embed/Gather")
    if gemma:
        scale = src.const_input(src.node("/model/embed_tokens/Mul"))
        (x,) = b.op("Mul", [x, b.const("embed_scale", scale.astype(np.float32))], "embed/Mul")

    modules = {"full_attention": "/model/rotary_emb", "sliding_attention": "/model/rotary_emb_local"}
    if not gemma and set(layer_types) != {"full_attention"}:
        raise Unsupported(f"{arch} with layer types {sorted(set(layer_types))}")
    tables = {kind: src.rotary(modules[kind], positions) for kind in sorted(set(layer_types))}
    caches = {kind: (b.const(f"{kind}.cos", c), b.const(f"{kind}.sin", s)) for kind, (c, s) in tables.items()}
    if next(iter(tables.values()))[0].shape[1] * 2 != head_dim:
        raise Unsupported("partial rotary embedding")

    def norm(prefix: str, x: str, skip: str | None = None) -> tuple[str, str | None]:
        """RMS norm of x (+ skip, whose sum is returned second when given)."""
        weight, eps = src.norm(prefix)
        w = b.const(prefix.strip("/").replace("/", ".") + ".weight", weight)
        if skip is None:
            return b.op("SimplifiedLayerNormalization", [x, w], prefix + "/SLN", epsilon=eps, axis=-1)[0], None
        out = b.op("SkipSimplifiedLayerNormalization", [x, skip, w], prefix + "/SkipSLN", outputs=4, domain=MS_DOMAIN,
                   epsilon=eps)
        b.nodes[-1].output[1] = b.nodes[-1].output[2] = ""
        return out[0], out[3]

    def project(prefixes: list[str], x: str, name: str, split: bool = True) -> list[str]:
        """The projections of x, concatenated into one product where possible (split back apart if asked)."""
        parts = [src.linear(p) for p in prefixes]
        merged = concat(parts)
        if merged is None:
            return [b.linear(lin, x, p) for lin, p in zip(parts, prefixes)]
        y = b.linear(merged, x, name)
        if len(parts) == 1 or not split:
            return [y]
        sizes = b.const(name + ".split", np.array([p.N for p in parts], np.int64))
        return b.op("Split", [y, sizes], name + "/Split", outputs=len(parts), axis=-1)

    residual, pending = x, None
    for i in range(layers):
        p = f"/model/layers.{i}"
        x, summed = norm(p + "/input_layernorm", pending or residual, residual if pending else None)
        residual = summed or residual
        a = p + "/self_attn"
        qkv = project([a + "/q_proj", a + "/k_proj", a + "/v_proj"], x, a + "/qkv_proj", split=gemma)
        attrs = dict(num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)
        if gemma:  # q/k norms per head before the rotary (onnxruntime's CPU kernel has no q/k norm inputs)
            heads_shape = b.const(a + ".heads_shape", np.array([0, -1, head_dim], np.int64))
            for k, kind in ((0, "q_norm"), (1, "k_norm")):
                (t,) = b.op("Reshape", [qkv[k], heads_shape], f"{a}/{kind}/ToHeads")
                qkv[k], _ = norm(f"{a}/{kind}", t)  # [tokens, heads, head_dim]: ToAttention reshapes it directly
            attrs["scale"] = float(config["query_pre_attn_scalar"]) ** -0.5
            if layer_types[i] == "sliding_attention":
                attrs["local_window_size"] = int(config["sliding_window"])
        cos, sin = caches[layer_types[i]]
        qkv = [b.op("Reshape", [t, bsd], f"{a}/ToAttention{k}")[0] for k, t in enumerate(qkv)]
        gqa_in = [*(qkv if len(qkv) == 3 else [qkv[0], "", ""]), f"past_key_values.{i}.key",
                  f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length", cos, sin]
        b.add("GroupQueryAttention", gqa_in, [a + "/GQA/out", f"present.{i}.key", f"present.{i}.value"], a + "/GQA",
              MS_DOMAIN, **attrs)
        inputs += [value_info(f"past_key_values.{i}.{t}", TensorProto.FLOAT,
                              ["batch", kv_heads, "capacity", head_dim]) for t in ("key", "value")]
        outputs += [value_info(f"present.{i}.{t}", TensorProto.FLOAT,
                               ["batch", kv_heads, "capacity", head_dim]) for t in ("key", "value")]
        (attn,) = b.op("Reshape", [a + "/GQA/out", b.const(a + ".rows", np.array([-1, heads * head_dim], np.int64))],
                       a + "/FromAttention")
        (attn,) = project([a + "/o_proj"], attn, a + "/o_proj")
        if gemma:
            attn, _ = norm(p + "/post_attention_layernorm", attn)
            x, residual = norm(p + "/pre_feedforward_layernorm", attn, residual)
        else:
            x, residual = norm(p + "/post_attention_layernorm", attn, residual)
        m = p + "/mlp"
        gate, up = project([m + "/gate_proj", m + "/up_proj"], x, m + "/gate_up_proj")
        if act == "silu":
            (gate,) = b.op("QuickGelu", [gate], m + "/act", domain=MS_DOMAIN, alpha=1.0)
        else:
            (gate,) = b.op("Gelu", [gate], m + "/act", approximate="tanh")
        (h,) = b.op("Mul", [gate, up], m + "/Mul")
        (pending,) = project([m + "/down_proj"], h, m + "/down_proj")
        if gemma:
            pending, _ = norm(p + "/post_feedforward_layernorm", pending)

    x, _ = norm("/model/norm", pending, residual)
    (x,) = b.op("Gather", [x, "logits_index"], "final/Gather", axis=0)
    b.linear(src.linear("/lm_head"), x, "/lm_head")
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(b.nodes, "calm_fused_decoder", inputs, outputs, b.initializers)
    return new_model(graph, OPSET, producer="calm_cli.fleet.graph.fuse")


def fuse_export(directory: Path) -> Path:
    """Write the compact graph next to the plain model.onnx of an export directory; returns its path."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    out = directory / FUSED_GRAPH
    data = directory / (FUSED_GRAPH + ".data")
    try:
        with data.open("wb") as file:
            model = build(_Source(directory / "model.onnx"), config, data, file)
        onnx.save_model(model, str(out))
    except BaseException:
        data.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        raise
    if data.stat().st_size == 0:
        data.unlink()
    return out
