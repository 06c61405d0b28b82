"""Cost model: forward FLOPs per sample, from the shapes on the graph's nodes.

Convolutions, linear layers and matmuls count 2 FLOPs per multiply-add; every other op that
yields a tensor counts one FLOP per output element. A training step costs about 3x forward.
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

TRAIN_STEP_FACTOR = 3  # forward + backward (grad wrt inputs and weights)


def _numel(shape: object) -> int:
    if isinstance(shape, tuple) and all(isinstance(s, int) for s in shape):
        return math.prod(shape)
    if isinstance(shape, tuple):
        return sum(_numel(s) for s in shape)
    return 0


def _aten(*names: str) -> set:
    from ptgraph.passes.rules import aten

    return set(aten(*names))


# torch-level functions (fx capture) and their ATen overloads (export capture)
_WEIGHTED = {F.conv1d, F.conv2d, F.conv3d, F.linear} | _aten(
    "conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding", "conv3d.padding",
    "linear.default")
_MATMULS = {torch.matmul, operator.matmul, torch.bmm} | _aten("matmul.default", "bmm.default", "mm.default")
_ADDMM = {torch.addmm} | _aten("addmm.default")
_SDPA = {F.scaled_dot_product_attention} | _aten("scaled_dot_product_attention.default")


ShapeOf = Callable[[object], "tuple | None"]  # a node (or any argument) -> its shape
ParamShape = Callable[[str], "tuple | None"]  # a parameter's qualified name -> its shape


def _meta_shape(n: object) -> tuple | None:
    return n.meta.get("shape") if isinstance(n, fx.Node) else None


def _tensor_shape(gm: fx.GraphModule) -> ParamShape:
    def shape(name: str) -> tuple | None:
        path, _, attr = name.rpartition(".")
        value = getattr(gm.get_submodule(path) if path else gm, attr, None)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return shape


def node_flops(gm: fx.GraphModule, node: fx.Node, shape_of: ShapeOf = _meta_shape,
               param_shape: ParamShape | None = None) -> int:
    """FLOPs of one node for the traced batch. `shape_of` and `param_shape` say what the shapes are: the
    graph's recorded shapes and the module's tensors by default, or the shapes a plan would leave
    (passes/predict.py), so that a plan's cost is counted without shrinking anything."""
    param_shape = param_shape or _tensor_shape(gm)
    out = shape_of(node)
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        weight = f"{node.target}.weight"
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return 2 * _numel(shape_of(node.args[0])) * math.prod(param_shape(weight)[1:])
        if isinstance(m, nn.modules.conv._ConvNd):
            return 2 * _numel(out) * math.prod(param_shape(weight)[1:])
        if isinstance(m, nn.Linear):
            return 2 * _numel(out) * param_shape(weight)[1]
        if isinstance(m, nn.MultiheadAttention):
            q = shape_of(node.args[0]) or ()
            tokens, e = _numel(q) // max(q[-1], 1) if q else 0, (q[-1] if q else 0)  # a query's width is embed_dim
            length = q[0] if q and not m.batch_first else (q[1] if len(q) > 1 else 1)
            return 2 * tokens * e * 4 * e + 4 * tokens * length * e
    if node.op == "call_function":
        if node.target in _WEIGHTED:
            w = shape_of(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")) or (0,)
            return 2 * _numel(out) * math.prod(w[1:])
        if node.target in _MATMULS:
            a = shape_of(node.args[0] if node.args else node.kwargs.get("input")) or (0,)
            return 2 * _numel(out) * a[-1]
        if node.target in _ADDMM:
            a = shape_of(node.args[1] if len(node.args) > 1 else node.kwargs.get("mat1")) or (0,)
            return 2 * _numel(out) * a[-1]
        if node.target in _SDPA:
            q, k = shape_of(node.args[0]) or (0,), shape_of(node.args[1]) or (0, 0)
            return 4 * _numel(q) * k[-2]
    if node.op == "call_method" and node.target in ("matmul", "bmm"):
        a = shape_of(node.args[0]) or (0,)
        return 2 * _numel(out) * a[-1]
    if node.op in ("call_module", "call_function", "call_method") and isinstance(out, tuple):
        return _numel(out)
    return 0


def forward_flops(gm: fx.GraphModule, shape_of: ShapeOf = _meta_shape, param_shape: ParamShape | None = None) -> int:
    """Forward FLOPs for one sample (the traced batch size divided out); shapes as in `node_flops`."""
    param_shape = param_shape or _tensor_shape(gm)
    total = sum(node_flops(gm, n, shape_of, param_shape) for n in gm.graph.nodes)
    batch = next((n.meta["shape"][0] for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("shape")), 1)
    return total // max(batch, 1)


def activation_elements(gm: fx.GraphModule) -> int:
    """Elements of every intermediate tensor per sample: what training keeps for backward, roughly."""
    total = sum(_numel(n.meta.get("shape")) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method"))
    batch = next((n.meta["shape"][0] for n in gm.graph.nodes if n.op == "placeholder" and n.meta.get("shape")), 1)
    return total // max(batch, 1)
