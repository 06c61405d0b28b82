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
        return freeze_everything(ctx, f"{ctx.node.name}: linear weights that are not parameters")
    return linear_types(ctx, ctx.arg(0, "input"), weight, bias, ctx.shape_of(w_node))


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
