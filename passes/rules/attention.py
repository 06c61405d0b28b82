"""Attention: matmul contractions, scaled_dot_product_attention and nn.MultiheadAttention.

A contraction couples the two operands' contracted channels (q·k over the head dim). A
parameter-free contraction of pruned channels is exact only if they are zero, which a mask
does not guarantee for every producer, so contracted channels are marked inexact.
nn.MultiheadAttention keeps one embed_dim for its input, its heads and its output, so its
embedding channels are frozen under fx; the MLPs around it stay prunable.

Heads: a projection's output reshaped to (..., heads, head_dim) before an attention op would by
default be tracked by head_dim (every head loses the same dims: inexact, since the scores scale
by 1/sqrt(head_dim), and rotary embeddings pair dims). `head_axes` finds those reshapes by walking
back from each attention op's head axis, and the reshape rule then tracks the heads instead:
whole heads go, which is exact, and the rotary and scaling arithmetic within a head is untouched.
A grouped-query kv head couples its group of q heads (through repeat_kv's expand + reshape, or
sdpa's enable_gqa).
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ptgraph.channels import TensorType
from ptgraph.passes.flow import ChannelFlow, Context, NodeType, freeze_everything
from ptgraph.passes.rules import OPAQUE_MODULES, aten, lookup, rule
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


_MATMULS = (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", *aten("matmul.default", "bmm.default", "mm.default"))
_SDPA = (F.scaled_dot_product_attention, *aten("scaled_dot_product_attention.default"))


@rule(*_MATMULS)
def matmul(ctx: Context) -> NodeType:
    return contract(ctx, ctx.arg(0, "input"), ctx.arg(1, "other", ctx.arg(1, "mat2")), -2)


@rule(*_SDPA)
def sdpa(ctx: Context) -> NodeType:
    """softmax(q k^T * scale + mask) v over (..., heads, seq, dim): batch and head axes of q, k, v and the
    mask are unified like an elementwise op's; the head dim is a contraction; the sequence axes stay."""
    q, k, v, mask = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value"), ctx.arg(3, "attn_mask")
    shapes = [ctx.shape_of(x) for x in (q, k, v)]
    if any(s is None or len(s) < 2 for s in shapes) or len({len(s) for s in shapes}) > 1:
        return freeze_everything(ctx)
    sq, sk, sv = shapes
    nd = len(sq)
    tq, tk, tv = (dict(ctx.type_of(x)) for x in (q, k, v))
    if nd >= 3 and sk[nd - 3] != sq[nd - 3]:  # grouped-query attention: each kv head serves n_rep q heads
        n_rep = sq[nd - 3] // sk[nd - 3]
        for t in (tk, tv):
            if nd - 3 in t:
                t[nd - 3] = np.repeat(t[nd - 3], n_rep)
        sk, sv = (s[:nd - 3] + (sq[nd - 3],) + s[nd - 2:] for s in (sk, sv))
    for t in (tq, tk, tv):
        if nd - 2 in t:
            ctx.freeze(t.pop(nd - 2), f"{ctx.node.name}: channels on the sequence axis")
    if nd - 1 in tq and nd - 1 in tk:
        ctx.unify(tq[nd - 1], tk[nd - 1])
        ctx.inexact(tq[nd - 1], f"{ctx.node.name}: head dim contracted and scaled by 1/sqrt(head dim)")
    elif nd - 1 in tq or nd - 1 in tk:
        ctx.freeze(tq.get(nd - 1, tk.get(nd - 1)), f"{ctx.node.name}: q and k dims of different origin")
    aligned = [(tq, sq), (tk, sk), (tv, sv)]
    ms = ctx.shape_of(mask) if isinstance(mask, fx.Node) else None
    if ms:
        tm = {a + nd - len(ms): ids for a, ids in ctx.type_of(mask).items()}
        for a in (nd - 2, nd - 1):
            if a in tm:
                ctx.freeze(tm.pop(a), f"{ctx.node.name}: channels on the mask's sequence axes")
        aligned.append((tm, (1,) * (nd - len(ms)) + ms))
    out = unify_aligned(ctx, aligned, ctx.out_shape, frozenset({nd - 2, nd - 1}))
    if nd - 1 in tv:
        out[nd - 1] = tv[nd - 1]
    return out


@rule(nn.MultiheadAttention)
def multihead_attention(ctx: Context) -> NodeType:
    return freeze_everything(ctx, f"nn.MultiheadAttention keeps embed_dim fixed ('{ctx.node.target}')")


OPAQUE_MODULES.add(nn.MultiheadAttention)  # captured by torch.export, its in/out projections carry the stream


def head_axes(flow: ChannelFlow) -> dict[fx.Node, int]:
    """Reshape node -> the output axis that holds an attention op's heads, for every reshape that splits
    channels into (heads, head dim) on the way to an attention op. Computed once per graph."""
    if "head_axes" not in flow.hints:
        gm = flow.graph.module
        found: dict[fx.Node, int] = {}
        for node in gm.graph.nodes:
            for operand in _attention_operands(node):
                _walk_back(gm, operand, len(operand.meta["shape"]) - 3, found)
        flow.hints["head_axes"] = found
    return flow.hints["head_axes"]


def _attention_operands(node: fx.Node) -> list[fx.Node]:
    """The operands of an attention op whose axis -3 is the head axis (4-D and up)."""
    if node.op not in ("call_function", "call_method"):
        return []
    if node.target in _SDPA:
        operands = list(node.args[:3])
    elif node.target in _MATMULS:
        operands = list(node.args[:2])
    else:
        return []
    if all(isinstance(x, fx.Node) and _shape(x) is not None and len(_shape(x)) >= 4 for x in operands):
        return operands
    return []


def _shape(node: object) -> tuple | None:
    s = node.meta.get("shape") if isinstance(node, fx.Node) else None
    return s if isinstance(s, tuple) and all(isinstance(d, int) for d in s) else None


def _walk_back(gm: fx.GraphModule, start: fx.Node, start_axis: int, found: dict[fx.Node, int]) -> None:
    """Follow one axis upstream through ops that keep it (elementwise, transposes, slices, merges) to the
    reshape that created it by a split; record that reshape with the axis."""
    from ptgraph.passes.rules import elementwise as ew, reduce, shape, slicing

    keeps_axes = {ew.unary, ew.nary, reduce.softmax, slicing.cat, slicing.slice_tensor, slicing.narrow, shape.expand}
    stack, seen = [(start, start_axis)], set()
    while stack:
        node, axis = stack.pop()
        out = _shape(node)
        if (node, axis) in seen or out is None or node.op not in ("call_function", "call_method", "call_module"):
            continue
        seen.add((node, axis))
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule_fn = lookup(node, module)
        x = node.args[0] if node.args else None
        if rule_fn in (shape.view, shape.unflatten, shape.unflatten_module, shape.reshape_by_shapes) and _shape(x) is not None:
            blocks = shape._blocks(_shape(x), out) or []
            for ins, outs in blocks:
                if axis not in outs:
                    continue
                if len(ins) == 1 and len(outs) > 1 and rule_fn is not shape.reshape_by_shapes:
                    found[node] = axis
                elif len(outs) == 1:  # a merge: follow its outermost real axis, not one an expand made
                    real = [i for i in ins if not _expanded(x, i)]
                    stack.append((x, next((i for i in real if _shape(x)[i] > 1), real[0] if real else ins[0])))
        elif rule_fn in (shape.permute, shape.transpose):
            perm = shape.permutation(node, len(out))
            if perm is not None:
                stack.append((x, perm[axis]))
        elif rule_fn is slicing.getitem and isinstance(x, fx.Node) and isinstance(node.args[1], int):
            src_rule = lookup(x, gm.get_submodule(x.target) if x.op == "call_module" else None)
            if src_rule is slicing.split and _shape(x.args[0]) is not None:
                src = x.args[0]
                if len(_shape(src)) > len(out):  # unbind: the split axis is gone
                    d = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
                    d = d % len(_shape(src))
                    stack.append((src, axis + (axis >= d)))
                else:
                    stack.append((src, axis))
        elif rule_fn in keeps_axes:
            for inp in node.all_input_nodes:
                s = _shape(inp)
                a = axis - (len(out) - len(s)) if s is not None else -1
                if s is not None and 0 <= a < len(s) and s[a] == out[axis]:
                    stack.append((inp, a))


def _expanded(node: object, axis: int) -> bool:
    """Whether `node` is an expand that made `axis` from a size-1 axis (grouped-query attention's repeat:
    once a kv head group is down to one head, only this tells the kv axis from the repeat axis)."""
    if not isinstance(node, fx.Node) or node.target not in ("expand", *aten("expand.default")):
        return False
    src, out = _shape(node.args[0]), _shape(node)
    if src is None or out is None:
        return False
    a = axis - (len(out) - len(src))
    return a < 0 or (src[a] == 1 and out[axis] > 1)
