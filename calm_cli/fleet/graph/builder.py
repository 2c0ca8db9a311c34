"""Graph-building helpers shared by the int4 rewrite and the fused decoder: nodes, initializers, the block-sum
step of the min corrections, opsets and value infos.

Needs onnx and numpy (export time only).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calm_cli.fleet.graph import names

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators (MatMulNBits, GroupQueryAttention, ...)
MS_OPSET = 1  # the only version of that domain
IR_VERSION = 10  # of graphs written from scratch: onnx 1.23's default (14) is newer than onnxruntime 1.31 reads


def opset_version(model: onnx.ModelProto, domain: str) -> int | None:
    """The model's opset for `domain` ('' and 'ai.onnx' both name the default one), None if it imports none."""
    for o in model.opset_import:
        if o.domain == domain or (domain == "" and o.domain == "ai.onnx"):
            return o.version
    return None


def import_ms_opset(model: onnx.ModelProto) -> None:
    """Make the model import onnxruntime's contrib domain, which its new nodes use."""
    if opset_version(model, MS_DOMAIN) is None:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, MS_OPSET))


def new_model(graph: onnx.GraphProto, opset: int, producer: str) -> onnx.ModelProto:
    """A model around a graph built from scratch, importing the default domain at `opset` and the contrib one."""
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, MS_OPSET)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name=producer)


def value_info(name: str, elem: int, shape: list | None) -> onnx.ValueInfoProto:
    """A graph input or output: element type and shape (names for dynamic dimensions)."""
    return helper.make_tensor_value_info(name, elem, shape)


class GraphBuilder:
    """The nodes and initializers of a graph as it is written, in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer holding `value`; returns its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def add(self, op_type: str, inputs: list[str], outputs: list[str], name: str, domain: str = "",
            **attrs) -> list[str]:
        """A node with the given output names; returns them."""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attrs) -> list[str]:
        """A node whose outputs are named after it ('{name}/out', or '{name}/out{k}' for several)."""
        outs = [f"{name}/out{k}" if outputs > 1 else f"{name}/out" for k in range(outputs)]
        return self.add(op_type, inputs, outs, name, domain, **attrs)

    def block_sum(self, x: str, shape: str, prefix: str, *, axes: str | None, block: int | None = None,
                  outputs: tuple[str, str] | None = None) -> str:
        """x summed over each block of its last axis: a Reshape to `shape` (..., blocks, block size), then a
        ReduceSum over the last axis. Returns the sums' name.

        The step of every min correction (y -= blocksum(x) @ mins). `axes` is the int64 [-1] initializer that
        ReduceSum takes as an input from opset 13; None writes the attribute form of older opsets. The nodes are
        named by :func:`names.block_reshape` and :func:`names.block_sum` (with `block` when given); `outputs`
        names the reshaped and summed tensors (default: after their nodes).
        """
        reshape_node, sum_node = names.block_reshape(prefix, block), names.block_sum(prefix, block)
        reshaped, summed = outputs or (reshape_node + "/out", sum_node + "/out")
        self.add("Reshape", [x, shape], [reshaped], reshape_node)
        if axes is None:
            self.add("ReduceSum", [reshaped], [summed], sum_node, axes=[-1], keepdims=0)
        else:
            self.add("ReduceSum", [reshaped, axes], [summed], sum_node, keepdims=0)
        return summed
