"""Pooling, resampling and reductions.

Spatial ops keep the channel axis; anything tracked on a pooled axis is frozen. Reducing or
normalising over a channel axis (mean, softmax) stays correct after a shrink but is not exact
(a removed channel no longer counts), so those channels are marked inexact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptgraph.passes.flow import Context, NodeType, freeze_everything
from ptgraph.passes.rules import aten, leaf_rule, rule

_SPATIAL = {
    1: [nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d, F.max_pool1d,
        F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.lp_pool1d],
    2: [nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, F.max_pool2d,
        F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.lp_pool2d],
    3: [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d, F.avg_pool3d,
        F.adaptive_avg_pool3d, F.adaptive_max_pool3d],
}
for _k in _SPATIAL:
    _SPATIAL[_k] += aten(*(f"{op}{_k}d{tail}.default" for op in ("max_pool", "avg_pool", "adaptive_avg_pool",
                                                                "_adaptive_avg_pool", "adaptive_max_pool")
                           for tail in ("", "_with_indices")))


def _spatial(k: int | None):
    def spatial(ctx: Context) -> NodeType:
        if isinstance(ctx.out_shape, tuple) and ctx.out_shape and isinstance(ctx.out_shape[0], tuple):
            return freeze_everything(ctx)  # return_indices=True
        x = ctx.arg(0, "input")
        nd = len(ctx.shape_of(x))
        first_spatial = nd - (k if k is not None else nd - 2)
        t = {}
        for axis, ids in ctx.type_of(x).items():
            if axis < first_spatial:
                t[axis] = ids
            else:
                ctx.freeze(ids, f"channels on a resampled axis ({ctx.node.name})")
        return t

    return spatial


for _k, _targets in _SPATIAL.items():
    rule(*_targets)(_spatial(_k))
# timm's TF "same"-padded pools (padding from the input size at run time: control flow fx cannot trace)
leaf_rule("timm.layers.pool2d_same.MaxPool2dSame", "timm.layers.pool2d_same.AvgPool2dSame")(_spatial(2))
rule(F.interpolate, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
     *aten("upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec", "upsample_linear1d.vec",
           "upsample_bilinear2d.vec", "upsample_bicubic2d.vec", "upsample_trilinear3d.vec"))(_spatial(None))


@rule(F.pad, "pad", *aten("pad.default", "constant_pad_nd.default", "reflection_pad1d.default",
                          "reflection_pad2d.default", "reflection_pad3d.default", "replication_pad1d.default",
                          "replication_pad2d.default", "replication_pad3d.default"),
      *(getattr(nn, f"{kind}Pad{k}d") for kind in ("Zero", "Constant", "Reflection", "Replication", "Circular")
        for k in (1, 2, 3) if hasattr(nn, f"{kind}Pad{k}d")))
def pad(ctx: Context) -> NodeType:
    """F.pad(x, (left, right, top, bottom, ...)) pads the last len(pad) // 2 axes, the last axis first. Only the
    axes actually padded (a pair that is not literally (0, 0)) freeze their channels: a channels-last map
    padded on H and W keeps its channel axis, whatever the layout."""
    x = ctx.arg(0, "input")
    amounts = ctx.module.padding if ctx.module is not None else ctx.arg(1, "pad", ctx.arg(1, "padding"))
    shape = ctx.shape_of(x)
    if shape is None or not isinstance(amounts, (list, tuple)) or len(amounts) % 2 or len(amounts) > 2 * len(shape):
        return freeze_everything(ctx)
    nd = len(shape)
    padded = {nd - 1 - i for i in range(len(amounts) // 2)
              if any(not isinstance(v, int) or v != 0 for v in amounts[2 * i:2 * i + 2])}
    t = {}
    for axis, ids in ctx.type_of(x).items():
        if axis in padded:
            ctx.freeze(ids, f"channels on a padded axis ({ctx.node.name})")
        else:
            t[axis] = ids
    return t


def _dims(dim: object, nd: int) -> set[int] | None:
    if dim is None:
        return set(range(nd))
    if isinstance(dim, int):
        return {dim % nd}
    if isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim):
        return {d % nd for d in dim}
    return None


@rule(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.nansum,
      "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "nansum",
      *aten("mean.dim", "mean.default", "sum.dim_IntList", "sum.default", "amax.default", "amin.default",
            "std.correction", "var.correction", "logsumexp.default", "nansum.default"))
def reduction(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    nd = len(ctx.shape_of(x))
    dims = _dims(ctx.arg(1, "dim"), nd)
    keep = isinstance(ctx.out_shape, tuple) and len(ctx.out_shape) == nd  # keepdim, wherever it was given
    if dims is None or not isinstance(ctx.out_shape, tuple):
        return freeze_everything(ctx)
    t = {}
    for axis, ids in ctx.type_of(x).items():
        if axis in dims:
            ctx.inexact(ids, f"reduction over channels ({ctx.node.name})")
        else:
            t[axis if keep else axis - sum(d < axis for d in dims)] = ids
    return t


@rule(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax", nn.Softmax,
      nn.LogSoftmax, F.normalize, *aten("softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default"))
def softmax(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    t = dict(ctx.type_of(x))
    nd = len(ctx.shape_of(x))
    if ctx.module is not None:
        dim = ctx.module.dim
    elif ctx.node.target is F.normalize:
        dim = ctx.arg(2, "dim", 1)
    else:
        dim = ctx.arg(1, "dim")
    dims = _dims(dim, nd) or set(t)
    for axis in dims & set(t):
        ctx.inexact(t[axis], f"{ctx.node.name} normalises over channels")
    return t
