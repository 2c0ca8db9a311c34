"""The node names one graph writer leaves for another reader, defined once.

Three parties read names rather than structure:

* the int4 rewrite (:mod:`calm_cli.fleet.graph.int4`) reads Optimum's node names to find each projection's
  transformers module, and names the nodes it writes after the MatMul they replace;
* the fused decoder (:mod:`calm_cli.fleet.graph.fuse`) finds the products of the int4 graph by those names;
* the engine benchmark's profile reader (:mod:`calm_cli.bench.engine_worker`) counts the block sums of the min
  corrections as weight-product time by the :data:`BLOCK_SUM` marker in the node name, in both graphs.

Plain strings only (no onnx): the profile reader imports this module.
"""

from __future__ import annotations

BLOCK_SUM = "/BlockSum"  # in the name of every node that sums an activation over weight blocks
_BLOCK_RESHAPE = "/BlockReshape"


def matmul(module_path: str) -> str:
    """Optimum's MatMul node of a projection: '/model/layers.0/self_attn/q_proj' -> '.../q_proj/MatMul'."""
    return module_path + "/MatMul"


def module_of(node_name: str) -> str | None:
    """The transformers module an Optimum node belongs to: '/model/layers.0/mlp/up_proj/MatMul' ->
    'model.layers.0.mlp.up_proj' (None for a node outside any module)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    return ".".join(parts[:-1])


def nbits(matmul_node: str) -> str:
    """The int4 rewrite's MatMulNBits node that replaces the MatMul node of that name."""
    return matmul_node + "_NBits"


def min_matmul(matmul_node: str) -> str:
    """The int4 rewrite's blocksum(A) @ mins product (its second input: the mins) for that MatMul node."""
    return matmul_node + "/MinMatMul"


def block_sum(prefix: str, block: int | None = None) -> str:
    """The node under `prefix` that sums an activation over blocks (of `block` features, when named by it)."""
    return prefix + BLOCK_SUM + ("" if block is None else f"_{block}")


def block_reshape(prefix: str, block: int | None = None) -> str:
    """The Reshape that splits an activation into blocks before :func:`block_sum` adds them up."""
    return prefix + _BLOCK_RESHAPE + ("" if block is None else f"_{block}")


def is_block_sum(node_name: str) -> bool:
    """Whether a node (or a profiler event named after it) is a block sum of a min correction."""
    return BLOCK_SUM in node_name
