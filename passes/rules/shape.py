"""View, reshape, flatten, squeeze, permute, transpose, expand: follow the channel axis through them.

Reshapes are read from the input and output shapes, split into blocks of axes with equal
products. A block that merges a tracked axis with untracked ones (flatten C,H,W) repeats each
channel over the merged positions. A block that splits a tracked axis (channel shuffle, heads)
keeps one part tracked and couples the others, so a prune keeps a product shape the runtime
reshape can still express: the innermost part by default, the heads when the split feeds an
attention op's head axis (rules/attention.py: head_axes). Literal sizes in the call are rewritten
after a shrink.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ptgraph.channels import TensorType
from ptgraph.passes.flow import Context, Counter, NodeType, freeze_everything
from ptgraph.passes.rules import aten, rule


def _blocks(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes that hold the same number of elements."""
    if 0 in a or 0 in b:
        return None
    out, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        si, sj, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = pa * a[i], i + 1
        if j < len(b):
            pb, j = pb * b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return None
        out.append((list(range(si, i)), list(range(sj, j))))
    return out


def reshape_type(ctx: Context, t: TensorType, a: tuple, b: tuple, track: int | None = None) -> TensorType:
    """The output type of reshaping a tensor of shape `a` and type `t` to shape `b`. A tracked axis split
    into several keeps output axis `track` tracked if it is one of them, else the innermost."""
    blocks = _blocks(a, b)
    if blocks is None:
        ctx.freeze(t)
        return {}
    out: TensorType = {}
    for ins, outs in blocks:
        typed = [d for d in ins if d in t]
        if not typed:
            continue
        if len(typed) > 1 or not outs or (len(ins) > 1 and len(outs) > 1):
            for d in typed:
                ctx.freeze(t[d], f"reshape mixes channel axes ({ctx.node.name})")
            continue
        d = typed[0]
        view = [1] * len(ins)
        view[ins.index(d)] = a[d]
        block = np.broadcast_to(t[d].reshape(view), [a[k] for k in ins]).reshape([b[k] for k in outs])
        if len(outs) == 1:
            out[outs[0]] = np.ascontiguousarray(block)
            continue
        inner = outs.index(track) if track in outs else max(k for k in range(len(outs)) if b[outs[k]] > 1)
        rows = np.moveaxis(block, inner, -1).reshape(-1, b[outs[inner]])
        if len(rows) > 1:
            ctx.unify(np.broadcast_to(rows[:1], rows[1:].shape), rows[1:])
        out[outs[inner]] = rows[0].copy()
    return out


def _rewrite_sizes(ctx: Context, out_type: TensorType, arg_index: int) -> None:
    """After a shrink, the sizes of tracked output axes in node.args[arg_index:] are set to their
    channel counts: literal sizes, and sizes computed at run time (`C // heads` with `C` read off
    another tensor, which need not have shrunk alike). A tracked axis holds channels born at
    parameters, so its size never depends on the input and a literal is always right. Untracked
    axes sized from channel counts keep their traced size (`_sizes_from_channels`)."""
    node = ctx.node
    flat = len(node.args) == arg_index + 1 and isinstance(node.args[arg_index], (tuple, list))
    sizes = list(node.args[arg_index]) if flat else list(node.args[arg_index:])
    literal = {a: ids for a, ids in out_type.items()
               if a < len(sizes) and (isinstance(sizes[a], fx.Node) or (isinstance(sizes[a], int) and sizes[a] != -1))}
    kept = _sizes_from_channels(ctx, sizes, out_type)
    if not literal and not kept:
        return

    def fix(count: Counter) -> None:
        new = list(sizes)
        for a, ids in literal.items():
            new[a] = count(ids)
        for a, size in kept.items():
            new[a] = size
        node.args = node.args[:arg_index] + ((type(node.args[arg_index])(new),) if flat else tuple(new))

    ctx.rewrite(fix)


_ARITH = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.mod, operator.truediv, int,
          *aten("sym_size.int")}


def _sizes_from_channels(ctx: Context, sizes: list, out_type: TensorType) -> dict[int, int]:
    """Untracked output axes whose size the graph computes from channel counts read at run time (Swin's
    head dim `C // heads`, C read off the stream): after a shrink the computed value would change while the
    axis keeps its size. Where only channel counts feed it (no input size), its traced value is right for
    every input and replaces it; where input sizes feed it too, the channels read are frozen."""
    kept: dict[int, int] = {}
    for a, size in enumerate(sizes):
        if a in out_type or not isinstance(size, fx.Node) or a >= len(ctx.out_shape):
            continue
        channels, other = _size_reads(ctx, size)
        if channels and not other:
            kept[a] = ctx.out_shape[a]
        elif channels:
            for ids in channels:
                ctx.freeze(ids, f"{ctx.node.name}: a size computed from channels and input sizes")
    return kept


def _size_reads(ctx: Context, size: fx.Node) -> tuple[list[np.ndarray], bool]:
    """The channel axes whose sizes an integer expression reads (x.shape[d], x.size(d) of a tracked axis d),
    and whether it reads anything else (an untracked size, a value the walk does not follow)."""
    channels, other, stack, seen = [], False, [size], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        read = _size_read(n)
        if read is not None:
            t = ctx.flow.types.get(read[0])
            if isinstance(t, dict) and read[1] is not None and read[1] in t:
                channels.append(t[read[1]])
            else:
                other = True
        elif n.op == "call_function" and n.target in _ARITH:
            stack.extend(n.all_input_nodes)
        else:
            other = True
    return channels, other


def _size_read(n: fx.Node) -> tuple[fx.Node, int | None] | None:
    """(tensor, axis) for x.size(d), x.shape[d], x.size()[d] or aten.sym_size(x, d), else None."""
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2 and isinstance(n.args[1], int):
        x, d = n.args
    elif n.op == "call_function" and n.target in aten("sym_size.int") and isinstance(n.args[1], int):
        x, d = n.args[:2]
    elif n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int):
        src = n.args[0]
        is_shape = isinstance(src, fx.Node) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1))
        if not is_shape:
            return None
        x, d = src.args[0], n.args[1]
    else:
        return None
    shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
    return (x, d % len(shape)) if isinstance(shape, tuple) and shape else (x, None)


@rule("view", "reshape", torch.reshape, *aten("view.default", "reshape.default", "_unsafe_view.default"))
def view(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    t = reshape_type(ctx, ctx.type_of(x), ctx.shape_of(x), ctx.out_shape, _tracked_part(ctx))
    if ctx.node.kwargs:
        ctx.freeze(t, f"{ctx.node.name}: shape given as a keyword")
        return {}
    _rewrite_sizes(ctx, t, 1)
    return t


def _tracked_part(ctx: Context) -> int | None:
    """The output axis that keeps the channels when this reshape splits a channel axis: an attention op's
    heads, else a conv's feature-map channels (C of a (C, H, W) split), else None (the innermost part)."""
    from ptgraph.passes.rules.attention import head_axes
    from ptgraph.passes.rules.conv import feature_map_axes

    track = head_axes(ctx.flow).get(ctx.node)
    return track if track is not None else feature_map_axes(ctx.flow).get(ctx.node)


@rule("reshape_as", "view_as")
def reshape_as(ctx: Context) -> NodeType:
    """x.reshape_as(other): the sizes come from `other` at run time, so the output's channels must be
    other's channels axis by axis (unified), and an axis only one of them tracks keeps its size."""
    from ptgraph.passes.rules.elementwise import unify_aligned

    x, other = ctx.arg(0, "input"), ctx.arg(1, "other")
    if ctx.shape_of(other) != ctx.out_shape or ctx.shape_of(x) is None:
        return freeze_everything(ctx)
    t = reshape_type(ctx, ctx.type_of(x), ctx.shape_of(x), ctx.out_shape)
    return unify_aligned(ctx, [(t, ctx.out_shape), (dict(ctx.type_of(other)), ctx.out_shape)], ctx.out_shape)


@rule(torch.flatten, "flatten", nn.Flatten, torch.squeeze, "squeeze", torch.unsqueeze,
      "unsqueeze", torch.atleast_2d, *aten("flatten.using_ints", "unsqueeze.default", "squeeze.dim", "squeeze.dims",
                                           "squeeze.default"))
def reshape_by_shapes(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    return reshape_type(ctx, ctx.type_of(x), ctx.shape_of(x), ctx.out_shape)


def _permuted(ctx: Context, perm: list[int]) -> NodeType:
    t = ctx.type_of(ctx.arg(0, "input"))
    where = {src: dst for dst, src in enumerate(perm)}
    return {where[a]: ids for a, ids in t.items()}


@rule("unflatten", torch.unflatten, *aten("unflatten.int"))
def unflatten(ctx: Context) -> NodeType:
    """x.unflatten(dim, sizes): a reshape whose literal sizes are rewritten like a view's."""
    x, d, sizes = ctx.arg(0, "input"), ctx.arg(1, "dim"), ctx.arg(2, "sizes")
    if not isinstance(d, int) or not isinstance(sizes, (list, tuple)) or len(ctx.node.args) < 3:
        return freeze_everything(ctx)
    d %= len(ctx.shape_of(x))
    t = reshape_type(ctx, ctx.type_of(x), ctx.shape_of(x), ctx.out_shape, _tracked_part(ctx))
    typed = {a - d: ids for a, ids in t.items() if d <= a < d + len(sizes) and sizes[a - d] != -1}
    if typed:
        node = ctx.node

        def fix(count: Counter) -> None:
            node.update_arg(2, [count(typed[i]) if i in typed else s for i, s in enumerate(sizes)])

        ctx.rewrite(fix)
    return t


@rule(nn.Unflatten)
def unflatten_module(ctx: Context) -> NodeType:
    """nn.Unflatten(dim, sizes): its sizes are a module attribute, set from the channels after a shrink."""
    m, x = ctx.module, ctx.arg(0, "input")
    t = reshape_type(ctx, ctx.type_of(x), ctx.shape_of(x), ctx.out_shape, _tracked_part(ctx))
    if not isinstance(m.dim, int) or not isinstance(m.unflattened_size, (list, tuple)):
        ctx.freeze(t, f"{ctx.node.name}: unflatten sizes that are not a list")
        return {}
    d, sizes = m.dim % len(ctx.shape_of(x)), tuple(m.unflattened_size)
    typed = {a - d: ids for a, ids in t.items() if d <= a < d + len(sizes) and sizes[a - d] != -1}
    if typed:
        def fix(count: Counter) -> None:
            m.unflattened_size = tuple(count(typed[i]) if i in typed else s for i, s in enumerate(sizes))

        ctx.on_shrink(fix)
    return t


_T = ("t", torch.t, "mT", *aten("t.default"))
_MOVEDIM = (torch.movedim, "movedim", *aten("movedim.int"))
_PERMUTE = (torch.permute, "permute", *aten("permute.default"))


def permutation(node: fx.Node, nd: int) -> list[int] | None:
    """For a permute/transpose/movedim node of `nd` output axes: output axis -> input axis, or None when
    its dims are not literal ints. Shared by the rules and the walk that finds attention heads."""
    def arg(i: int, name: str) -> object:
        return node.args[i] if len(node.args) > i else node.kwargs.get(name)

    if node.target in _PERMUTE:
        dims = node.args[1:] if len(node.args) > 2 else arg(1, "dims")
        return [d % nd for d in dims] if all(isinstance(d, int) for d in dims) else None
    if node.target in _T:
        d0, d1 = nd - 2, nd - 1
    else:
        d0, d1 = arg(1, "dim0"), arg(2, "dim1")
        if not isinstance(d0, int) or not isinstance(d1, int):
            return None
        d0, d1 = d0 % nd, d1 % nd
    perm = list(range(nd))
    if node.target in _MOVEDIM:
        perm.remove(d0)
        perm.insert(d1, d0)
    else:
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@rule(*_PERMUTE)
def permute(ctx: Context) -> NodeType:
    perm = permutation(ctx.node, len(ctx.out_shape))
    return freeze_everything(ctx) if perm is None else _permuted(ctx, perm)


@rule(torch.transpose, "transpose", torch.swapaxes, "swapaxes", *_T, *_MOVEDIM, *aten("transpose.int", "swapaxes.default"))
def transpose(ctx: Context) -> NodeType:
    perm = permutation(ctx.node, len(ctx.out_shape))
    return freeze_everything(ctx) if perm is None else _permuted(ctx, perm)


@rule("expand", *aten("expand.default"))
def expand(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    off = len(ctx.out_shape) - len(ctx.shape_of(x))
    t = {a + off: ids for a, ids in ctx.type_of(x).items() if ctx.shape_of(x)[a] == ctx.out_shape[a + off]}
    for a, ids in ctx.type_of(x).items():
        if a + off not in t:
            ctx.freeze(ids, f"broadcast of a single channel in {ctx.node.name}")
    _rewrite_sizes(ctx, t, 1)
    return t


@rule("repeat", torch.tile, "tile", *aten("repeat.default"))
def repeat(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    off = len(ctx.out_shape) - len(ctx.shape_of(x))
    t = {}
    for a, ids in ctx.type_of(x).items():
        if ctx.out_shape[a + off] == len(ids):
            t[a + off] = ids
        else:
            ctx.freeze(ids, f"channels repeated by {ctx.node.name}")
    return t


@rule("size", "dim", "numel", "ndimension", "nelement", "get_device", *aten("sym_size.int", "sym_numel.default"))
def shape_query(ctx: Context) -> NodeType:
    """Sizes read at run time stay true after a shrink; nothing to freeze."""
    return None


@rule(getattr)
def attribute(ctx: Context) -> NodeType:
    name = ctx.arg(1)
    if name in ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"):
        return None
    if name in ("T", "mT"):
        nd = len(ctx.out_shape)
        perm = list(range(nd))[::-1] if name == "T" else [*range(nd - 2), nd - 1, nd - 2]
        return _permuted(ctx, perm)
    return freeze_everything(ctx)
