"""Linear layers and embeddings: features on the last axis; every other axis passes through."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ptgraph.passes.flow import Context, Counter, NodeType, freeze_everything
from ptgraph.passes.rules import rule


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


@rule(F.linear)
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
