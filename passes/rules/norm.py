"""Normalisation layers: the type passes through; affine parameters and running stats are bound to it.

BatchNorm and InstanceNorm normalise each channel on its own, so pruning is exact. LayerNorm
over the channel axis (and GroupNorm with one group) mixes channels in its statistics:
the channels stay prunable but are marked inexact. GroupNorm with several groups couples each
group's channels into one, so whole groups go and the rest keep their statistics (exact).
"""
from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import fx, nn

from ptgraph.passes.flow import Context, Counter, NodeType, freeze_everything, set_arg
from ptgraph.passes.rules import RULES, aten, leaf_rule, qualname, rule

_PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _bind_all(ctx: Context, names: list[str | None], axis: int, ids: np.ndarray) -> None:
    for name in names:
        if name is not None:
            ctx.bind(name, axis, ids)


@rule(*_PER_CHANNEL)
def batch_norm_module(ctx: Context) -> NodeType:
    m = ctx.module
    t = dict(ctx.type_of(ctx.arg(0, "input")))
    if 1 in t:
        present = [k for k in ("weight", "bias", "running_mean", "running_var") if getattr(m, k, None) is not None]
        ids = t[1]
        _bind_all(ctx, [ctx.param_name(k) for k in present], 0, ids)

        def fix(count: Counter) -> None:
            m.num_features = count(ids)

        ctx.on_shrink(fix)
    return t


_TORCH_SLOTS = [(1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")]  # F.batch_norm, F.instance_norm
_ATEN_SLOTS = [(1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")]  # aten.batch_norm, instance_norm


@rule(F.batch_norm, F.instance_norm, *aten("batch_norm.default", "instance_norm.default"))
def batch_norm_function(ctx: Context) -> NodeType:
    t = dict(ctx.type_of(ctx.arg(0, "input")))
    slots = _TORCH_SLOTS if ctx.node.target in (F.batch_norm, F.instance_norm) else _ATEN_SLOTS
    nodes = [ctx.arg(i, k) for i, k in slots]
    names = [ctx.attr_name(n) for n in nodes]
    if any(n is not None and name is None for n, name in zip(nodes, names)):
        ctx.freeze(t, f"{ctx.node.name}: norm statistics that are not parameters")
        return t
    if 1 in t:
        _bind_all(ctx, names, 0, t[1])
    return t


def _layer_norm(ctx: Context, x: object, shape0: tuple, names: list[str | None]) -> tuple[NodeType, dict]:
    """Bind LayerNorm params over the last len(shape0) axes; returns the type and axis->ids it covers."""
    t = dict(ctx.type_of(x))
    nd, k = len(ctx.shape_of(x)), len(shape0)
    covered = {a - (nd - k): ids for a, ids in t.items() if a >= nd - k}
    for axis, ids in covered.items():
        _bind_all(ctx, names, axis, ids)
        ctx.inexact(ids, f"LayerNorm statistics over channels ({ctx.node.name})")
    return t, covered


def _normalized_shape(shape0: tuple, covered: dict, count: Counter) -> tuple:
    return tuple(count(covered[i]) if i in covered else s for i, s in enumerate(shape0))


@rule(nn.LayerNorm, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
def layer_norm_module(ctx: Context) -> NodeType:
    m = ctx.module
    names = [ctx.param_name(k) for k in ("weight", "bias") if getattr(m, k, None) is not None]
    shape0 = tuple(m.normalized_shape)
    t, covered = _layer_norm(ctx, ctx.arg(0, "input"), shape0, names)

    def fix(count: Counter) -> None:
        m.normalized_shape = _normalized_shape(shape0, covered, count)

    ctx.on_shrink(fix)
    return t


@rule(F.layer_norm, *aten("layer_norm.default"), *([F.rms_norm] if hasattr(F, "rms_norm") else []),
      *aten("rms_norm.default"))
def layer_norm_function(ctx: Context) -> NodeType:
    """F.layer_norm(x, shape, weight, bias) and F.rms_norm(x, shape, weight): the same binding."""
    shape_arg = ctx.arg(1, "normalized_shape")
    rms = "rms_norm" in str(ctx.node.target)
    affine = [ctx.arg(i, k) for i, k in (((2, "weight"),) if rms else ((2, "weight"), (3, "bias")))]
    names = [ctx.attr_name(a) for a in affine]
    if not isinstance(shape_arg, (tuple, list)) or not all(isinstance(s, int) for s in shape_arg):
        return freeze_everything(ctx, f"{ctx.node.name}: normalized_shape computed at run time")
    shape0 = tuple(shape_arg)
    t, covered = _layer_norm(ctx, ctx.arg(0, "input"), shape0, names)
    for a, name in zip(affine, names):
        if isinstance(a, fx.Node) and name is None:
            _unify_computed_affine(ctx, a, covered)
    node = ctx.node

    def fix(count: Counter) -> None:
        set_arg(node, 1, "normalized_shape", type(shape_arg)(_normalized_shape(shape0, covered, count)))

    if covered:
        ctx.rewrite(fix)
    return t


def _unify_computed_affine(ctx: Context, operand: fx.Node, covered: dict) -> None:
    """A weight or bias the graph computes (a parameter cast first, `self.weight.float()` in HF's RMSNorms)
    scales the normalised channels one to one: its channels are theirs; where either side is untyped, both stay."""
    typed = ctx.type_of(operand)
    for i in set(covered) | set(typed):
        if i in covered and i in typed:
            ctx.unify(typed[i], covered[i])
        else:
            ctx.freeze(covered[i] if i in covered else typed[i], f"{ctx.node.name}: norm affine operand of fixed size")


def _group_norm(ctx: Context, x: object, groups: int, names: list[str | None]) -> tuple[NodeType, np.ndarray | None]:
    t = dict(ctx.type_of(x))
    ids = t.get(1)
    if ids is None:
        return t, None
    _bind_all(ctx, names, 0, ids)
    if groups == 1 and len(ids) > 1:
        ctx.inexact(ids, f"GroupNorm with one group ({ctx.node.name})")
    elif groups < len(ids):
        blocks = ids.reshape(groups, -1)
        ctx.unify(np.repeat(blocks[:, :1], blocks.shape[1] - 1, axis=1), blocks[:, 1:])
    return t, ids


@rule(nn.GroupNorm)
def group_norm_module(ctx: Context) -> NodeType:
    m = ctx.module
    names = [ctx.param_name(k) for k in ("weight", "bias") if getattr(m, k, None) is not None]
    groups0 = m.num_groups
    t, ids = _group_norm(ctx, ctx.arg(0, "input"), groups0, names)
    if ids is not None:
        n0 = len(ids)

        def fix(count: Counter) -> None:
            m.num_channels = count(ids)
            m.num_groups = 1 if groups0 == 1 else groups0 * m.num_channels // n0

        ctx.on_shrink(fix)
    return t


@rule(F.group_norm, *aten("group_norm.default"))
def group_norm_function(ctx: Context) -> NodeType:
    groups0 = ctx.arg(1, "num_groups")
    affine = [ctx.arg(i, k) for i, k in ((2, "weight"), (3, "bias"))]
    names = [ctx.attr_name(a) for a in affine]
    t, ids = _group_norm(ctx, ctx.arg(0, "input"), groups0, names)
    for a, name in zip(affine, names):
        if isinstance(a, fx.Node) and name is None:
            _unify_computed_affine(ctx, a, {} if ids is None else {0: ids})
    if ids is not None and groups0 > 1:
        node, n0 = ctx.node, len(ids)

        def fix(count: Counter) -> None:
            set_arg(node, 1, "num_groups", groups0 * count(ids) // n0)

        ctx.rewrite(fix)
    return t


@rule(nn.LocalResponseNorm, F.local_response_norm)
def local_response_norm(ctx: Context) -> NodeType:
    t = dict(ctx.type_of(ctx.arg(0, "input")))
    if 1 in t:
        ctx.inexact(t[1], f"LocalResponseNorm mixes neighbouring channels ({ctx.node.name})")
        ctx.freeze(t[1], f"LocalResponseNorm mixes neighbouring channels ({ctx.node.name})")
    return t


@leaf_rule("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct")
def batch_norm_act(ctx: Context) -> NodeType:
    """timm's BatchNorm + dropout + activation in one module. Its forward reads self.training
    (traced, every BatchNorm would keep using batch statistics in eval), so it stays one node:
    a BatchNorm followed by its `drop` and `act` submodules, which must be elementwise."""
    from ptgraph.passes.rules.elementwise import unary

    m = ctx.module
    for part in ("drop", "act"):
        sub = getattr(m, part, None)
        if sub is not None and unary not in (RULES.get(type(sub)), RULES.get(qualname(type(sub)))):
            return freeze_everything(ctx, f"{type(sub).__name__} inside BatchNormAct '{ctx.node.target}' "
                                          "is not a known elementwise op")
    return batch_norm_module(ctx)
