"""Elementwise ops: unary ops keep the type; n-ary ops with broadcasting unify their operands."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ptgraph.channels import TensorType
from ptgraph.passes.flow import Context, NodeType, freeze_everything
from ptgraph.passes.rules import aten, leaf_rule, rule

UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.elu, F.selu, F.celu, F.leaky_relu, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.square, torch.clamp, torch.clip, torch.erf, torch.sin, torch.cos,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torchvision.ops.stochastic_depth, operator.neg, torch.nan_to_num,
]
UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "square",
    "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "contiguous", "clone", "detach", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "requires_grad_", "erf", "sin", "cos", "nan_to_num", "hardtanh_",
]
UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU,
    nn.CELU, nn.LeakyReLU, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Sigmoid, nn.Tanh,
    torchvision.ops.StochasticDepth, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
]

UNARY_ATEN = aten(
    "relu.default", "relu_.default", "relu6.default", "gelu.default", "silu.default", "silu_.default", "mish.default",
    "hardswish.default", "hardsigmoid.default", "hardtanh.default", "hardtanh_.default", "elu.default", "selu.default",
    "hardswish_.default", "hardsigmoid_.default", "gelu_.default", "mish_.default", "elu_.default", "selu_.default",
    "celu_.default", "leaky_relu_.default", "sigmoid_.default", "tanh_.default", "relu6_.default",
    "celu.default", "leaky_relu.default", "softplus.default", "sigmoid.default", "tanh.default", "exp.default",
    "log.default", "sqrt.default", "rsqrt.default", "abs.default", "neg.default", "square.default", "clamp.default",
    "clamp_min.default", "clamp_max.default", "erf.default", "sin.default", "cos.default", "nan_to_num.default",
    "reciprocal.default", "dropout.default", "feature_dropout.default", "alpha_dropout.default",
    "feature_alpha_dropout.default", "dropout_.default", "feature_dropout_.default", "alpha_dropout_.default",
    "feature_alpha_dropout_.default", "contiguous.default", "clone.default", "alias.default", "detach.default",
    "lift_fresh_copy.default", "to.dtype", "to.dtype_layout", "to.device", "to.other", "_to_copy.default",
    "type_as.default", "pow.Tensor_Scalar", "zeros_like.default", "ones_like.default", "empty_like.default",
    "full_like.default",
)

# Stochastic depth of optional libraries: its forward reads self.training (kept whole, see leaf_rule);
# a per-sample mask, channel by channel the identity in eval.
MODE_DEPENDENT_UNARY = ["timm.layers.drop.DropPath"]
# timm's own parameter-free activations (elementwise; kept whole so BatchNormAct2d can name them)
TIMM_ACTIVATIONS = [f"timm.layers.activations.{n}" for n in (
    "GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "QuickGELU", "Sigmoid", "Swish", "Tanh")]


@leaf_rule(*MODE_DEPENDENT_UNARY, *TIMM_ACTIVATIONS)
@rule(*UNARY_FUNCTIONS, *UNARY_METHODS, *UNARY_MODULES, *UNARY_ATEN)
def unary(ctx: Context) -> NodeType:
    first = ctx.arg(0, "input")
    if ctx.shape_of(first) == ctx.out_shape:  # other tensor args (type_as, to) only lend a dtype
        return dict(ctx.type_of(first))
    return elementwise(ctx, ctx.tensor_args())


def elementwise(ctx: Context, operands: list) -> TensorType:
    """Broadcast the operands against the output shape and unify their channels axis by axis.

    An operand that is not typed along an axis where the output varies keeps that axis fixed,
    so the typed operands' channels there are frozen; an operand of size 1 there broadcasts.
    """
    out = ctx.out_shape
    if not isinstance(out, tuple) or not all(isinstance(s, int) for s in out):
        return freeze_everything(ctx)
    nd = len(out)
    aligned = []  # (type with output axes, shape aligned to output)
    for op in operands:
        shape = ctx.shape_of(op)
        if shape is None:
            continue
        off = nd - len(shape)
        aligned.append(({a + off: ids for a, ids in ctx.type_of(op).items()}, (1,) * off + tuple(shape)))
    return unify_aligned(ctx, aligned, out)


def unify_aligned(ctx: Context, aligned: list[tuple[TensorType, tuple]], out: tuple,
                  skip: frozenset[int] = frozenset()) -> TensorType:
    """Per output axis (but `skip`): unify the operands' channels. `aligned` holds each operand's type
    and shape with axes already aligned to the output's.

    A typed operand of size 1 on an axis where the output is larger broadcasts one channel (frozen);
    an untyped operand of the output's size keeps that axis fixed, so the typed ones are frozen.
    """
    result: TensorType = {}
    for axis in sorted({a for t, _ in aligned for a in t} - skip):
        full = [t[axis] for t, s in aligned if axis in t and s[axis] == out[axis]]
        broadcast = [t[axis] for t, s in aligned if axis in t and s[axis] != out[axis]]
        fixed = any(axis not in t and s[axis] == out[axis] and s[axis] > 1 for t, s in aligned)
        for ids in broadcast:
            ctx.freeze(ids, f"broadcast of a single channel in {ctx.node.name}")
        if fixed or not full:
            for ids in full:
                ctx.freeze(ids, f"operand of fixed size in {ctx.node.name}")
            continue
        for ids in full[1:]:
            ctx.unify(full[0], ids)
        result[axis] = full[0]
    return result


BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, operator.isub,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.where,
    torch.pow, operator.pow, torch.addcmul, torch.lerp, torch.true_divide,
]
BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "where", "addcmul",
    "lerp", "expand_as",
]
BINARY_ATEN = aten(
    "add.Tensor", "add_.Tensor", "sub.Tensor", "rsub.Tensor", "rsub.Scalar", "mul.Tensor", "mul_.Tensor", "div.Tensor",
    "div.Tensor_mode", "maximum.default", "minimum.default", "where.self", "pow.Tensor_Tensor", "addcmul.default",
    "lerp.Scalar", "add.Scalar", "mul.Scalar", "sub.Scalar", "div.Scalar",
)


@rule(*BINARY_FUNCTIONS, *BINARY_METHODS, *BINARY_ATEN)
def nary(ctx: Context) -> NodeType:
    return elementwise(ctx, ctx.tensor_args())


@rule(nn.PReLU, F.prelu, *aten("prelu.default", "_prelu_kernel.default"))
def prelu(ctx: Context) -> NodeType:
    x = ctx.arg(0, "input")
    t = ctx.type_of(x)
    if ctx.module is not None:
        name, n = ctx.param_name("weight"), ctx.module.num_parameters
    else:
        name, n = ctx.attr_name(ctx.arg(1, "weight")), ctx.shape_of(ctx.arg(1, "weight"))[0]
    if n > 1 and 1 in t:
        ctx.bind(name, 0, t[1])
    elif n > 1 and name is not None:
        ctx.freeze(ctx.param_axis(name, 0, n), "PReLU weight on fixed channels")
    return dict(t)

