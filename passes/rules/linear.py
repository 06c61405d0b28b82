"""Linear layers and embeddings: features on the last axis; every other axis passes through."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.passes.flow import Context, Counter, NodeType, freeze_everything
from ptgraph.passes.rules import aten, rule


def linear_types(ctx: Context, x: object, weight: str, bias: str | None, w_shape: tuple) -> NodeType:
    t = dict(ctx.type_of(x))
    last = len(ctx.shape_of(x)) - 1
    if last in t:
        ctx.bind(weight, 1, t.pop(last))
    out = ctx.param_axis(weight, 0, w_shape[0])
    if bias is not None:
        ctx.bind(bias, 0, out)
    t[last] = out
    return t


@rule(nn.Linear)
def linear_module(ctx: Context) -> NodeType:
    m = ctx.module
    t = linear_types(ctx, ctx.arg(0, "input"), ctx.param_name("weight"),
                     ctx.param_name("bias") if m.bias is not None else None, tuple(m.weight.shape))

    def fix(count: Counter) -> None:
        m.out_features, m.in_features = m.weight.shape

    ctx.on_shrink(fix)
    return t


@rule(F.linear, *aten("linear.default"))
def linear_function(ctx: Context) -> NodeType:
    w_node, b_node = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    weight, bias = ctx.attr_name(w_node), ctx.attr_name(b_node)
    if weight is None or (b_node is not None and bias is None):
        return computed_linear_types(ctx, ctx.arg(0, "input"), w_node, b_node)
    return linear_types(ctx, ctx.arg(0, "input"), weight, bias, ctx.shape_of(w_node))


def computed_linear_types(ctx: Context, x: object, w_node: object, b_node: object) -> NodeType:
    """F.linear on a weight or bias the graph computes (a parameter cast first, HF's `self.weight.float()`):
    the operands' own channel types are the layer's, as a parameter's would be; where one side of a
    coupling is untyped (a tensor of fixed size), the other side's channels are frozen."""
    t = dict(ctx.type_of(x))
    last = len(ctx.shape_of(x)) - 1
    w, b = ctx.type_of(w_node), ctx.type_of(b_node)
    reason = f"{ctx.node.name}: linear weight of fixed size"
    _couple(ctx, t.pop(last, None), w.get(1), reason)
    out = w.get(0)
    if b_node is not None:
        _couple(ctx, out, b.get(0), reason)
    if out is not None:
        t[last] = out
    return t


def _couple(ctx: Context, a, b, reason: str) -> None:
    """The same channels on both sides: unified when both are typed, frozen when only one is."""
    if a is not None and b is not None:
        ctx.unify(a, b)
    elif a is not None or b is not None:
        ctx.freeze(a if a is not None else b, reason)


@rule(nn.Embedding)
def embedding(ctx: Context) -> NodeType:
    m = ctx.module
    freeze_everything(ctx)  # the indices
    nd = len(ctx.out_shape)
    out = ctx.param_axis(ctx.param_name("weight"), 1, m.embedding_dim)

    def fix(count: Counter) -> None:
        m.embedding_dim = m.weight.shape[1]

    ctx.on_shrink(fix)
    return {nd - 1: out}


@rule(torch.addmm, *aten("addmm.default"))
def addmm(ctx: Context) -> NodeType:
    """bias + x @ W with W stored (in, out): Hugging Face's Conv1D (GPT-2), as fx or export sees it."""
    b_node, x, w_node = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    weight, bias = ctx.attr_name(w_node), ctx.attr_name(b_node)
    if weight is None or bias is None or len(ctx.shape_of(b_node) or ()) != 1 or ctx.node.kwargs:
        return freeze_everything(ctx, f"{ctx.node.name}: addmm that is not bias + x @ weight")
    t = dict(ctx.type_of(x))
    if 1 in t:
        ctx.bind(weight, 0, t.pop(1))
    out = ctx.param_axis(weight, 1, ctx.shape_of(w_node)[1])
    ctx.bind(bias, 0, out)
    t[1] = out
    return t


@rule(*aten("embedding.default"))
def embedding_function(ctx: Context) -> NodeType:
    """aten.embedding(weight, indices): one row of the table per index, features on the last axis."""
    w_node = ctx.arg(0, "weight")
    weight = ctx.attr_name(w_node)
    if weight is None:
        return freeze_everything(ctx, f"{ctx.node.name}: an embedding table that is not a parameter")
    ctx.freeze(ctx.type_of(ctx.arg(1, "indices")), f"{ctx.node.name}: channels used as indices")
    return {len(ctx.out_shape) - 1: ctx.param_axis(weight, 1, ctx.shape_of(w_node)[1])}
