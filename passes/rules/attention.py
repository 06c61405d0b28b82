"""Attention: matmul contractions, scaled_dot_product_attention and nn.MultiheadAttention.

A contraction couples the two operands' contracted channels (q·k over the head dim). A
parameter-free contraction of pruned channels is exact only if they are zero, which a mask
does not guarantee for every producer, so contracted channels are marked inexact.
nn.MultiheadAttention keeps one embed_dim for its input, its heads and its output, so its
embedding channels are frozen; the MLPs around it stay prunable.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.channels import TensorType
from ptgraph.passes.flow import Context, NodeType, freeze_everything
from ptgraph.passes.rules import rule
from ptgraph.passes.rules.elementwise import unify_aligned


def _batch_axes(ctx: Context, ta: TensorType, sa: tuple, tb: TensorType, sb: tuple, nd: int) -> TensorType:
    """Broadcast batch axes (all but the last two) like an elementwise op."""
    aligned = [({a + nd - len(s): ids for a, ids in t.items() if a < len(s) - 2}, (1,) * (nd - len(s)) + s)
               for t, s in ((ta, sa), (tb, sb))]
    return unify_aligned(ctx, aligned, ctx.out_shape, frozenset({nd - 2, nd - 1}))


def contract(ctx: Context, a: object, b: object, b_axis: int) -> TensorType:
    """a (..., n, k) times b: a's last axis meets b's axis `b_axis` (-2 for matmul)."""
    sa, sb = ctx.shape_of(a), ctx.shape_of(b)
    ta, tb = ctx.type_of(a), ctx.type_of(b)
    if len(sa) < 2 or len(sb) < 2:
        return freeze_everything(ctx)
    ka, kb = len(sa) - 1, len(sb) + b_axis
    if ka in ta and kb in tb:
        ctx.unify(ta[ka], tb[kb])
        ctx.inexact(ta[ka], f"parameter-free contraction over channels ({ctx.node.name})")
    elif ka in ta or kb in tb:
        ctx.freeze(ta.get(ka, tb.get(kb)), f"contraction with a fixed-size operand ({ctx.node.name})")
    nd = len(ctx.out_shape)
    out = _batch_axes(ctx, ta, sa, tb, sb, nd)
    if len(sa) - 2 in ta:
        out[nd - 2] = ta[len(sa) - 2]
    other = len(sb) - 1 if b_axis == -2 else len(sb) - 2
    if other in tb:
        out[nd - 1] = tb[other]
    return out


@rule(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
def matmul(ctx: Context) -> NodeType:
    return contract(ctx, ctx.arg(0, "input"), ctx.arg(1, "other", ctx.arg(1, "mat2")), -2)


@rule(F.scaled_dot_product_attention)
def sdpa(ctx: Context) -> NodeType:
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    if ctx.arg(3, "attn_mask") is not None or not all(isinstance(ctx.shape_of(x), tuple) for x in (q, k, v)):
        return freeze_everything(ctx)
    scores = contract(ctx, q, k, -1)  # q @ k^T over the head dim
    last = len(ctx.shape_of(q)) - 1
    tq = ctx.type_of(q)
    if last in tq:
        ctx.inexact(tq[last], f"{ctx.node.name} scales by 1/sqrt(head dim)")
    if len(ctx.shape_of(q)) - 2 in tq:
        ctx.freeze(tq[len(ctx.shape_of(q)) - 2], f"{ctx.node.name}: channels on the sequence axis")
    tv = ctx.type_of(v)
    out = {a: ids for a, ids in scores.items() if a < last - 1}
    vlast = len(ctx.shape_of(v)) - 1
    for a, ids in tv.items():
        if a == vlast:
            out[last] = ids
        elif a == vlast - 1:
            ctx.freeze(ids, f"{ctx.node.name}: channels on the sequence axis")
    return out


@rule(nn.MultiheadAttention)
def multihead_attention(ctx: Context) -> NodeType:
    return freeze_everything(ctx, f"nn.MultiheadAttention keeps embed_dim fixed ('{ctx.node.target}')")
