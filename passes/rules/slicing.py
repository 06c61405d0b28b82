"""cat, stack, split, chunk, narrow and indexing: channel lists are concatenated and sliced.

Sizes and offsets written into the graph (split sections, slice bounds, chunk counts) are
rewritten after every shrink from the surviving channels, so each piece keeps its channels.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from ptgraph.channels import TensorType
from ptgraph.passes.flow import Context, Counter, NodeType, freeze_everything, set_arg
from ptgraph.passes.rules import aten, rule
from ptgraph.passes.rules.elementwise import unify_aligned


@rule(torch.cat, torch.concat, torch.concatenate, *aten("cat.default", "concat.default"))
def cat(ctx: Context) -> NodeType:
    tensors = ctx.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(n, fx.Node) for n in tensors):
        return freeze_everything(ctx)
    nd = len(ctx.out_shape)
    tensors = [n for n in tensors if not (ctx.shape_of(n) == (0,) and nd > 1)]  # cat skips an empty 1-D operand (a cache's start)
    shapes = [ctx.shape_of(n) for n in tensors]
    d = ctx.arg(1, "dim", 0) % nd
    parts = [ctx.type_of(n) for n in tensors]
    out = unify_aligned(ctx, list(zip(parts, shapes)), ctx.out_shape, frozenset({d}))
    if any(d in t for t in parts):
        pieces = []
        for t, s in zip(parts, shapes):
            if d in t:
                pieces.append(t[d])
            else:
                fixed = ctx.space.new(s[d])
                ctx.freeze(fixed, f"fixed-size operand of {ctx.node.name}")
                pieces.append(fixed)
        out[d] = np.concatenate(pieces)
    return out


@rule(torch.stack, *aten("stack.default"))
def stack(ctx: Context) -> NodeType:
    tensors = ctx.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(n, fx.Node) for n in tensors):
        return freeze_everything(ctx)
    nd = len(ctx.out_shape)
    d = ctx.arg(1, "dim", 0) % nd
    parts = [{a + (a >= d): ids for a, ids in ctx.type_of(n).items()} for n in tensors]
    shapes = [ctx.shape_of(n)[:d] + (1,) + ctx.shape_of(n)[d:] for n in tensors]
    return unify_aligned(ctx, list(zip(parts, shapes)), ctx.out_shape, frozenset({d}))


@rule(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split", torch.unbind, "unbind",
      *aten("split.Tensor", "split_with_sizes.default", "chunk.default", "unbind.int", "tensor_split.sections"))
def split(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    pieces = ctx.out_shape
    if not isinstance(pieces, tuple) or not pieces:
        return freeze_everything(ctx)
    target = ctx.node.target
    name = target if isinstance(target, str) else target.__name__
    unbind = name.split(".")[0] == "unbind"
    d = ctx.arg(2 if not unbind else 1, "dim", 0) % len(ctx.shape_of(x))
    t = ctx.type_of(x)
    rest = {a: ids for a, ids in t.items() if a != d}
    if unbind:  # the split axis disappears
        if d in t:
            ctx.freeze(t[d], f"{ctx.node.name} takes channels one by one")
        return tuple({a - (a > d): ids for a, ids in rest.items()} for _ in pieces)
    if d not in t:
        return tuple(dict(rest) for _ in pieces)
    bounds = np.cumsum([0] + [p[d] for p in pieces])
    parts = [t[d][bounds[i]:bounds[i + 1]] for i in range(len(pieces))]
    node = ctx.node

    def fix(count: Counter) -> None:  # every form becomes split with explicit sections
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, [count(p) for p in parts], d), {}

    ctx.rewrite(fix)
    return tuple({**rest, d: p} for p in parts)


@rule(*aten("slice.Tensor"))
def slice_tensor(ctx: Context) -> NodeType:
    """aten.slice(x, dim, start, end, step): x[..., start:end] as torch.export writes it."""
    x = ctx.arg(0, "input")
    nd = len(ctx.shape_of(x))
    d, start, end, step = ctx.arg(1, "dim", 0), ctx.arg(2, "start"), ctx.arg(3, "end"), ctx.arg(4, "step", 1)
    if not all(v is None or isinstance(v, int) for v in (d, start, end, step)):
        return freeze_everything(ctx)
    d = d % nd
    t = dict(ctx.type_of(x))
    if d not in t:
        return t
    ids, s = t[d], slice(start, end)
    if step not in (None, 1):
        ctx.freeze(ids, f"{ctx.node.name} slices channels with a step")
        return {a: v for a, v in t.items() if a != d}
    t[d] = ids[s]
    node, lo, hi = ctx.node, ids[:s.start] if s.start is not None else ids[:0], ids[:s.stop] if s.stop is not None else None

    def fix(count: Counter) -> None:
        set_arg(node, 2, "start", count(lo))
        if hi is not None:
            set_arg(node, 3, "end", count(hi))

    ctx.rewrite(fix)
    return t


@rule(*aten("select.int"))
def select(ctx: Context) -> NodeType:
    """aten.select(x, dim, index): x[..., index], one position; the axis disappears."""
    x, d = ctx.arg(0, "input"), ctx.arg(1, "dim")
    if not isinstance(d, int):
        return freeze_everything(ctx)
    d = d % len(ctx.shape_of(x))
    t = ctx.type_of(x)
    if d in t:
        ctx.freeze(t[d], f"{ctx.node.name} picks single channels")
    return {a - (a > d): ids for a, ids in t.items() if a != d}


@rule("narrow", torch.narrow, *aten("narrow.default"))
def narrow(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    nd = len(ctx.shape_of(x))
    d, start, length = ctx.arg(1, "dim"), ctx.arg(2, "start"), ctx.arg(3, "length")
    t = dict(ctx.type_of(x))
    if not all(isinstance(v, int) for v in (d, start, length)):
        return freeze_everything(ctx)
    d = d % nd
    if d not in t:
        return t
    ids = t[d]
    t[d] = ids[start:start + length]
    node, before, inside = ctx.node, ids[:start], ids[start:start + length]

    def fix(count: Counter) -> None:
        node.args = (x, d, count(before), count(inside))

    ctx.rewrite(fix)
    return t


@rule(operator.getitem)
def getitem(ctx: Context) -> NodeType:
    src, index = ctx.arg(0), ctx.arg(1)
    st = ctx.flow.types.get(src) if isinstance(src, fx.Node) else None
    if st is None and isinstance(src, fx.Node) and src.op == "get_attr":
        st = ctx.type_of(src)  # a tensor attribute indexed directly (typed on first use)
    if isinstance(st, tuple):
        return st[index] if isinstance(index, int) else freeze_everything(ctx)
    if not isinstance(st, dict):
        return None if not isinstance(ctx.out_shape, tuple) else freeze_everything(ctx)
    return _index_tensor(ctx, src, st, index)


@rule(*aten("index.Tensor"))
def index_tensor(ctx: Context) -> NodeType:
    """aten.index(x, [None, ..., idx]): x[:, ..., idx] as torch.export writes it; one tensor index, the
    axes before it taken whole, read like the same getitem."""
    src, indices = ctx.arg(0, "input"), ctx.arg(1, "indices")
    if not isinstance(src, fx.Node) or not isinstance(indices, (list, tuple)):
        return freeze_everything(ctx)
    tensors = [p for p, i in enumerate(indices) if i is not None]
    if len(tensors) != 1 or not isinstance(indices[tensors[0]], fx.Node):
        return freeze_everything(ctx, f"advanced indexing ({ctx.node.name})")
    pos = tensors[0]
    return _gather(ctx, src, ctx.type_of(src), (slice(None),) * pos + (indices[pos],), pos)


def _index_tensor(ctx: Context, src: fx.Node, t: TensorType, index: object) -> NodeType:
    idx = index if isinstance(index, tuple) else (index,)
    nd = len(ctx.shape_of(src))
    advanced = [p for p, i in enumerate(idx) if isinstance(i, (fx.Node, list, torch.Tensor))]
    if len(advanced) == 1 and isinstance(idx[advanced[0]], fx.Node) and Ellipsis not in idx:
        return _gather(ctx, src, t, idx, advanced[0])
    if advanced or sum(i is Ellipsis for i in idx) > 1:
        return freeze_everything(ctx, f"advanced indexing ({ctx.node.name})")
    n_real = sum(i is not None and i is not Ellipsis for i in idx)
    out: TensorType = {}
    sliced: dict[int, tuple[np.ndarray, slice]] = {}  # position in idx -> (ids, slice)
    a = o = 0
    for pos, i in enumerate(idx):
        if i is None:
            o += 1
        elif i is Ellipsis:
            for _ in range(nd - n_real):
                if a in t:
                    out[o] = t[a]
                a, o = a + 1, o + 1
        elif isinstance(i, int):
            if a in t:
                ctx.freeze(t[a], f"{ctx.node.name} picks single channels")
            a += 1
        elif isinstance(i, slice):
            if a in t:
                if i == slice(None):
                    out[o] = t[a]
                elif all(v is None or isinstance(v, int) for v in (i.start, i.stop)) and i.step in (None, 1):
                    out[o] = t[a][i]
                    sliced[pos] = (t[a], i)
                else:
                    ctx.freeze(t[a], f"{ctx.node.name} slices channels with a step")
            a, o = a + 1, o + 1
        else:
            return freeze_everything(ctx)
    for rest in range(a, nd):
        if rest in t:
            out[o + rest - a] = t[rest]
    if sliced:
        node = ctx.node

        def fix(count: Counter) -> None:
            new = list(idx)
            for pos, (ids, s) in sliced.items():
                new[pos] = slice(None if s.start is None else count(ids[:s.start]),
                                 None if s.stop is None else count(ids[:s.stop]))
            node.args = (src, tuple(new) if isinstance(index, tuple) else new[0])

        ctx.rewrite(fix)
    return out


def _gather(ctx: Context, src: fx.Node, t: TensorType, idx: tuple, pos: int) -> NodeType:
    """x[:, index_tensor] with one tensor index among full slices (an attention-bias table read
    through a table of positions): the indexed axis is replaced by the index's axes, whose values
    pick positions, so channels on the indexed axis are frozen; the other axes pass through."""
    index = idx[pos]
    ishape = ctx.shape_of(index)
    if ishape is None or any(not (isinstance(i, slice) and i == slice(None)) for p, i in enumerate(idx) if p != pos):
        return freeze_everything(ctx, f"advanced indexing ({ctx.node.name})")
    index_type = ctx.flow.types.get(index)  # an index buffer is not typed: its axes hold no channels
    if isinstance(index_type, dict):
        ctx.freeze(index_type, f"{ctx.node.name} uses a tensor as indices")
    if pos in t:
        ctx.freeze(t[pos], f"{ctx.node.name} gathers along a channel axis")
    shift = len(ishape) - 1
    return {a if a < pos else a + shift: ids for a, ids in t.items() if a != pos}
