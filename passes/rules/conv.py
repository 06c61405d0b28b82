"""Convolutions: plain, grouped, depthwise, transposed; as modules or as F.conv*d on parameters.

weight: (out, in/groups, *k). With groups == 1 the weight's in-axis holds the input's channels
and its out-axis is a new space. With groups > 1 a block of input channels only meets its own
block of output channels, so each block (inputs and outputs together) is one channel: blocks
are pruned whole and `groups` shrinks with them, which keeps every remaining block exact.
"""
from __future__ import annotations

import numpy as np
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ptgraph.passes.flow import ChannelFlow, Context, Counter, NodeType, freeze_everything, set_arg
from ptgraph.passes.rules import aten, leaf_rule, rule


def conv_types(ctx: Context, x: object, weight: str, bias: str | None, w_shape: tuple, groups: int,
               transposed: bool) -> tuple[NodeType, np.ndarray | None, np.ndarray]:
    """Bind the conv's parameters; returns (output type, input elements or None, output elements)."""
    t = dict(ctx.type_of(x))
    for axis in [a for a in t if a >= 2]:  # a spatial axis cannot be tracked through a conv
        ctx.freeze(t.pop(axis), f"channels on a spatial axis of {ctx.node.name}")
    x_ids = t.pop(1, None)
    if transposed:
        out = ctx.param_axis(weight, 1, w_shape[1])
        if groups == 1 and x_ids is not None:
            ctx.bind(weight, 0, x_ids)
        elif groups > 1:
            if x_ids is not None:
                ctx.freeze(x_ids, f"grouped transposed conv {ctx.node.name}")
            ctx.freeze(out, f"grouped transposed conv {ctx.node.name}")
    else:
        out = ctx.param_axis(weight, 0, w_shape[0])
        if groups == 1:
            if x_ids is not None:
                ctx.bind(weight, 1, x_ids)
        elif x_ids is None:
            ctx.freeze(out, f"grouped conv {ctx.node.name} on fixed input channels")
        else:
            blocks = np.concatenate([x_ids.reshape(groups, -1), out.reshape(groups, -1)], axis=1)
            ctx.unify(np.repeat(blocks[:, :1], blocks.shape[1] - 1, axis=1), blocks[:, 1:])
    if bias is not None:
        ctx.bind(bias, 0, out)
    t[1] = out
    return t, x_ids, out


_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@rule(*_CONV_MODULES)
def conv_module(ctx: Context) -> NodeType:
    return _conv_module(ctx)[0]


def _conv_module(ctx: Context) -> tuple[NodeType, np.ndarray | None]:
    m = ctx.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    out_type, x_ids, out = conv_types(
        ctx, ctx.arg(0, "input"), ctx.param_name("weight"), ctx.param_name("bias") if m.bias is not None else None,
        tuple(m.weight.shape), m.groups, transposed,
    )
    groups0, out0 = m.groups, len(out)

    def fix(count: Counter) -> None:
        w = m.weight
        if transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.groups = groups0 * count(out) // out0 if groups0 > 1 else 1
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups

    ctx.on_shrink(fix)
    return out_type, x_ids


# TF "same" padding computed from the input size at run time (control flow fx cannot trace): the
# padding is spatial, the channels are a conv's.
leaf_rule("timm.layers.conv2d_same.Conv2dSame")(conv_module)


# Weight-standardised convs (timm's StdConv2d, ScaledStdConv2d for BiT, NFNet): the forward
# standardises each output channel's weights over (in/groups, *k) with F.batch_norm, then convolves.
# Kept whole (leaf_rule): per output channel the standardisation is its own, so output channels
# are exact; with groups == 1 the statistics run over all input channels, so removing one changes
# every output (inexact); with groups > 1 an input block goes with its outputs and stays exact.
# The forward reads self.out_channels, which the conv fix keeps current; ScaledStdConv2d's gain
# (out, 1, 1, 1) is bound to the outputs; its fan-in scale is a float set at construction and is
# not recomputed (inexact inputs only).
@leaf_rule("timm.layers.std_conv.StdConv2d", "timm.layers.std_conv.StdConv2dSame",
           "timm.layers.std_conv.ScaledStdConv2d", "timm.layers.std_conv.ScaledStdConv2dSame")
def std_conv(ctx: Context) -> NodeType:
    m = ctx.module
    out_type, x_ids = _conv_module(ctx)
    gain = getattr(m, "gain", None)
    if isinstance(gain, nn.Parameter):
        ctx.bind(ctx.param_name("gain"), 0, ctx.param_axis(ctx.param_name("weight"), 0, m.weight.shape[0]))
    if x_ids is not None and m.groups == 1:
        ctx.inexact(x_ids, f"weight standardisation over input channels ({ctx.node.name})")
    return out_type


def _functional(transposed: bool):
    def conv_function(ctx: Context) -> NodeType:
        w_node, b_node = ctx.arg(1, "weight"), ctx.arg(2, "bias")
        weight, bias = ctx.attr_name(w_node), ctx.attr_name(b_node)
        groups = ctx.arg(6, "groups", 1)  # index 6 in both signatures
        if weight is None or (b_node is not None and bias is None) or not isinstance(groups, int):
            return freeze_everything(ctx, f"{ctx.node.name}: conv weights that are not parameters")
        out_type, _, out = conv_types(ctx, ctx.arg(0, "input"), weight, bias, ctx.shape_of(w_node), groups, transposed)
        if groups > 1 and not transposed:
            node, out0 = ctx.node, len(out)

            def fix(count: Counter) -> None:
                set_arg(node, 6, "groups", groups * count(out) // out0)

            ctx.rewrite(fix)
        return out_type

    return conv_function


conv_function = rule(F.conv1d, F.conv2d, F.conv3d, *aten("conv1d.default", "conv2d.default", "conv3d.default",
                                                          "conv1d.padding", "conv2d.padding", "conv3d.padding"))(
    _functional(False))
conv_transpose_function = rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                               *aten("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"))(
    _functional(True))


def feature_map_axes(flow: ChannelFlow) -> dict[fx.Node, int]:
    """Reshape node -> 1, for every reshape that splits features into (C, H, W) on the way to an op that reads
    axis 1 of a feature map as channels (a conv, a batch norm): `Linear(512, 4096)` then `view(-1, 256, 4, 4)`.
    The reshape rule then tracks C (each channel a run of H*W features) instead of the innermost part, which
    the conv would freeze as channels on a spatial axis. Computed once per graph, only where a reshape splits."""
    if "feature_map_axes" not in flow.hints:
        from ptgraph.passes.rules import lookup
        from ptgraph.passes.rules.attention import _shape, _walk_back
        from ptgraph.passes.rules.norm import batch_norm_function, batch_norm_module

        readers = {conv_module, std_conv, conv_function, conv_transpose_function, batch_norm_module,
                   batch_norm_function}
        gm = flow.graph.module
        nodes = list(gm.graph.nodes)
        found: dict[fx.Node, int] = {}
        if any(_splits(n) for n in nodes):
            for node in nodes:
                if node.op not in ("call_function", "call_module") or not node.args:
                    continue
                x = node.args[0]
                module = gm.get_submodule(node.target) if node.op == "call_module" else None
                if isinstance(x, fx.Node) and len(_shape(x) or ()) >= 3 and lookup(node, module) in readers:
                    _walk_back(gm, x, 1, found)
        flow.hints["feature_map_axes"] = found
    return flow.hints["feature_map_axes"]


def _splits(node: fx.Node) -> bool:
    """A call whose output has more axes than its first input: a candidate reshape."""
    x = node.args[0] if node.op in ("call_function", "call_method", "call_module") and node.args else None
    out, src = node.meta.get("shape"), x.meta.get("shape") if isinstance(x, fx.Node) else None
    return isinstance(out, tuple) and isinstance(src, tuple) and len(out) > len(src)
