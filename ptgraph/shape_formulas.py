"""Output shapes by formula for the common ops, so shape propagation dispatches nothing to meta kernels.

A meta kernel costs 0.1-10 ms (most run Python decompositions: a meta BatchNorm ~1 ms, a meta
layer_norm ~3-10 ms, a meta MultiheadAttention ~5 ms), a formula a few microseconds. Each formula
returns an empty meta tensor of the output's shape, dtype and memory layout, or None where it does
not apply (an input that does not fit, an unusual argument, a layout it does not model); then the
op runs on meta tensors as before, and raises where the input does not fit.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Formula = Callable[..., "Tensor | None"]  # (module or None, *args, **kwargs) -> output, or None: run the op


def empty(shape: Any, like: Tensor) -> Tensor:
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def dense(x: Tensor) -> bool:
    """Non-overlapping and dense: what empty_like and elementwise kernels copy the strides of."""
    if x.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda p: p[1]):
        if size < 2:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def like(x: Tensor) -> Tensor:
    """torch.empty_like(x) without its meta dispatch (~0.2 ms): x's strides where x is dense."""
    if dense(x):
        return torch.empty_strided(tuple(x.shape), x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _one_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    return args[0] if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) else None


# -- modules --------------------------------------------------------------------------------------
# Output = input's shape. Any subclass (as before: BatchNorm subclasses with an activation inside).
_SAME_SHAPE_MODULES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
)
# Exact classes only: elementwise activations, and torchvision's StochasticDepth (eval: the identity).
_SAME_SHAPE_EXACT = {nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Dropout1d, nn.Dropout2d,
                     nn.Dropout3d, nn.AlphaDropout}
_SAME_SHAPE_NAMES = {"torchvision.ops.stochastic_depth.StochasticDepth"}


def _same_module(m: nn.Module, *args: Any, **kwargs: Any) -> Tensor | None:
    x = _one_tensor(args, kwargs)
    return like(x) if x is not None else None


def conv_shape(m: nn.modules.conv._ConvNd, x: Tensor) -> tuple[int, ...] | None:
    """A convolution's output shape by its formula; None when the formula does not apply (unbatched
    input, transposed conv, an input that does not fit: the meta kernel decides, and raises)."""
    dims = len(m.kernel_size)
    shape = tuple(x.shape)
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or len(shape) != dims + 2 or shape[1] != m.in_channels:
        return None
    if m.padding == "same":
        return (shape[0], m.out_channels, *shape[2:])
    padding = (0,) * dims if m.padding == "valid" else m.padding
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, p, d, k, s in zip(shape[2:], padding, m.dilation, m.kernel_size, m.stride)]
    return (shape[0], m.out_channels, *out)


def _conv(m: nn.modules.conv._ConvNd, *args: Any, **kwargs: Any) -> Tensor | None:
    x = _one_tensor(args, kwargs)
    shape = conv_shape(m, x) if x is not None else None
    return empty(shape, x) if shape is not None else None


def _linear(m: nn.Linear, *args: Any, **kwargs: Any) -> Tensor | None:
    x = _one_tensor(args, kwargs)
    if x is None or x.dim() < 1 or x.shape[-1] != m.in_features:
        return None
    return empty((*x.shape[:-1], m.out_features), x)


def _tuple(v: Any, n: int) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return tuple(v)
    return None


def pool_shape(x: Tensor, dims: int, kernel: Any, stride: Any, padding: Any, dilation: Any,
               ceil_mode: bool) -> tuple[int, ...] | None:
    """Max/avg pooling's output shape (floor mode, batched, contiguous input); None: let the kernel decide."""
    k, p, d = _tuple(kernel, dims), _tuple(padding, dims), _tuple(dilation, dims)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and not len(stride)) else _tuple(stride, dims)
    if ceil_mode or None in (k, s, p, d) or x.dim() != dims + 2 or not x.is_contiguous() \
            or min(x.shape[1:]) < 1 or min((*k, *s, *d)) < 1 or min(p) < 0:
        return None
    out = []
    for size, ki, si, pi, di in zip(x.shape[2:], k, s, p, d):
        if pi > ki // 2:
            return None  # the kernel raises: padding over half the kernel
        o = (size + 2 * pi - di * (ki - 1) - 1) // si + 1
        if o < 1:
            return None
        out.append(o)
    return (*x.shape[:2], *out)


def _pool(m: nn.Module, *args: Any, **kwargs: Any) -> Tensor | None:
    x = _one_tensor(args, kwargs)
    if x is None or getattr(m, "return_indices", False):
        return None
    shape = pool_shape(x, _POOL_DIMS[type(m)], m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1),
                       m.ceil_mode)
    return empty(shape, x) if shape is not None else None


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}


def adaptive_shape(x: Tensor, dims: int, output_size: Any) -> tuple[int, ...] | None:
    """Adaptive pooling's output shape (batched, contiguous, non-empty input)."""
    if x.dim() != dims + 2 or not x.is_contiguous() or min(x.shape[1:]) < 1:
        return None
    size = (output_size,) * dims if isinstance(output_size, int) else tuple(output_size)
    if len(size) != dims:
        return None
    out = [x.shape[2 + i] if s is None else s for i, s in enumerate(size)]
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 1 for o in out):
        return None
    return (*x.shape[:2], *out)


def _adaptive(m: nn.Module, *args: Any, **kwargs: Any) -> Tensor | None:
    x = _one_tensor(args, kwargs)
    if x is None or getattr(m, "return_indices", False):
        return None
    shape = adaptive_shape(x, _ADAPTIVE_DIMS[type(m)], m.output_size)
    return empty(shape, x) if shape is not None else None


_ADAPTIVE_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                  nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


def _attention(m: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
    """(q, k, v, need_weights=False), batched: the meta run's (output, None); the output is the
    (L, N, E) result, transposed back to (N, L, E) when batch_first."""
    if len(args) != 3 or set(kwargs) - {"need_weights"} or kwargs.get("need_weights", True) is not False:
        return None
    q, k, v = args
    if not all(isinstance(t, Tensor) and t.dim() == 3 and t.dtype == q.dtype and t.device == q.device for t in args):
        return None
    if m.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    w = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight
    if q.shape[2] != m.embed_dim or k.shape[2] != m.kdim or v.shape[2] != m.vdim or k.shape[:2] != v.shape[:2] \
            or k.shape[1] != q.shape[1] or w.dtype != q.dtype or m.out_proj.weight.dtype != q.dtype:
        return None
    out = torch.empty((q.shape[0], q.shape[1], m.out_proj.out_features), dtype=q.dtype, device=q.device)
    return (out.transpose(0, 1) if m.batch_first else out), None


_MODULES: dict[type, Formula] = {nn.Linear: _linear, nn.MultiheadAttention: _attention,
                                 **{t: _pool for t in _POOL_DIMS}, **{t: _adaptive for t in _ADAPTIVE_DIMS}}
_module_cache: dict[type, Formula | None] = {}


def module_formula(m: nn.Module) -> Formula | None:
    """The formula for a module's class (looked up once per class)."""
    cls = type(m)
    if cls not in _module_cache:
        _module_cache[cls] = _find_module_formula(cls)
    return _module_cache[cls]


def _find_module_formula(cls: type) -> Formula | None:
    if issubclass(cls, _SAME_SHAPE_MODULES) or cls in _SAME_SHAPE_EXACT \
            or f"{cls.__module__}.{cls.__qualname__}" in _SAME_SHAPE_NAMES:
        return _same_module
    if issubclass(cls, nn.modules.conv._ConvNd):
        return _conv
    return _MODULES.get(cls)


# -- functions and methods ------------------------------------------------------------------------
def broadcast(a: tuple, b: tuple) -> tuple[int, ...] | None:
    n = max(len(a), len(b))
    out = []
    for x, y in zip((1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(out)


def _binary(op: Any) -> Formula:
    def formula(_: None, *args: Any, **kwargs: Any) -> Tensor | None:
        if kwargs or len(args) != 2 or not all(isinstance(a, Tensor) for a in args):
            return None
        a, b = args
        shape = broadcast(a.shape, b.shape)
        dtype = torch.result_type(a, b)
        if shape is None or a.device != b.device or (op is operator.truediv and not dtype.is_floating_point):
            return None
        return torch.empty(shape, dtype=dtype, device=a.device)

    return formula


def _unary(_: None, x: Any = None, *args: Any, **kwargs: Any) -> Tensor | None:
    """Elementwise ops of one tensor (the other arguments are flags): the input's layout where dense."""
    if not isinstance(x, Tensor) or not dense(x) or any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
        return None
    return like(x)


def _cat(_: None, tensors: Any = None, dim: Any = 0, **kwargs: Any) -> Tensor | None:
    dim = kwargs.pop("dim", dim)
    if kwargs or not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    first = tensors[0]
    if not all(isinstance(t, Tensor) and t.is_contiguous() for t in tensors):
        return None
    n = first.dim()
    if n < 1 or not -n <= dim < n:
        return None
    dim %= n
    total = 0
    for t in tensors:
        if t.dim() != n or t.dtype != first.dtype or t.device != first.device \
                or t.shape[:dim] != first.shape[:dim] or t.shape[dim + 1:] != first.shape[dim + 1:]:
            return None
        total += t.shape[dim]
    return empty((*first.shape[:dim], total, *first.shape[dim + 1:]), first)


def _layer_norm(_: None, x: Any = None, normalized_shape: Any = None, weight: Any = None, bias: Any = None,
                *rest: Any, **kwargs: Any) -> Tensor | None:
    """F.layer_norm: a contiguous output of the input's shape (as its meta kernel gives)."""
    weight, bias = kwargs.pop("weight", weight), kwargs.pop("bias", bias)
    kwargs.pop("eps", None)
    if rest[1:] or kwargs or not isinstance(x, Tensor) or not isinstance(normalized_shape, (list, tuple)):
        return None
    norm = tuple(normalized_shape)
    if not norm or len(norm) > x.dim() or tuple(x.shape[-len(norm):]) != norm:
        return None
    for p in (weight, bias):
        if p is not None and (not isinstance(p, Tensor) or tuple(p.shape) != norm or p.dtype != x.dtype):
            return None
    return empty(x.shape, x)


def _adaptive_fn(dims: int) -> Formula:
    def formula(_: None, x: Any = None, output_size: Any = None, **kwargs: Any) -> Tensor | None:
        output_size = kwargs.pop("output_size", output_size)
        if kwargs or not isinstance(x, Tensor) or output_size is None:
            return None
        shape = adaptive_shape(x, dims, output_size)
        return empty(shape, x) if shape is not None else None

    return formula


_BINARY_OPS = {operator.add: operator.add, operator.sub: operator.sub, operator.mul: operator.mul,
               operator.truediv: operator.truediv, torch.add: operator.add, torch.sub: operator.sub,
               torch.mul: operator.mul}
_UNARY = (torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.silu, F.gelu, F.hardswish,
          F.hardsigmoid, F.leaky_relu, F.mish)
FUNCTIONS: dict[Any, Formula] = {
    **{f: _binary(op) for f, op in _BINARY_OPS.items()}, **{f: _unary for f in _UNARY},
    torch.cat: _cat, torch.concat: _cat, F.layer_norm: _layer_norm,
    F.adaptive_avg_pool1d: _adaptive_fn(1), F.adaptive_avg_pool2d: _adaptive_fn(2), F.adaptive_avg_pool3d: _adaptive_fn(3),
}
METHODS: dict[str, Formula] = {
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "relu": _unary, "sigmoid": _unary, "tanh": _unary,
}
