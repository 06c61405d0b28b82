"""Shape propagation on meta tensors: every node learns its output shape without computing anything.

Like torch/fx/passes/shape_prop.py, but stores only what the channel analysis and the cost
model need (`node.meta["shape"]`: a tuple of ints, or a tuple of them for tuple outputs), and
runs with every parameter and input swapped for a meta tensor, so a ResNet-50 costs
milliseconds instead of a real forward pass. A graph with an op that has no meta kernel, or a
leaf module that reads tensor values, is run once for real instead.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


# Meta kernels of these go through Python decompositions (BatchNorm costs ~1 ms on meta);
# their output has their input's shape, so that is what they get.
_SAME_SHAPE_MODULES = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Identity,
)
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}


def _conv_shape(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[int, ...] | None:
    """A convolution's output shape by its formula (a meta conv costs a dispatch through Python); None when
    the formula does not apply (unbatched input, transposed conv)."""
    dims = len(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd) or x.dim() != dims + 2 or x.shape[1] != m.in_channels:
        return None  # the meta kernel decides, and raises where the input does not fit
    if m.padding == "same":
        return (x.shape[0], m.out_channels, *x.shape[2:])
    padding = (0,) * dims if m.padding == "valid" else m.padding
    out = [(size + 2 * p - d * (k - 1) - 1) // s + 1
           for size, p, d, k, s in zip(x.shape[2:], padding, m.dilation, m.kernel_size, m.stride)]
    return (x.shape[0], m.out_channels, *out)


class _ShapeInterpreter(fx.Interpreter):
    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            x = args[0]
            if isinstance(module, _SAME_SHAPE_MODULES):
                return torch.empty_like(x)
            if isinstance(module, nn.modules.conv._ConvNd) and x.device.type == "meta":
                shape = _conv_shape(module, x)
                if shape is not None:
                    return torch.empty(shape, dtype=x.dtype, device=x.device)
            if isinstance(module, nn.Linear) and x.device.type == "meta" and x.dim() >= 1 \
                    and x.shape[-1] == module.in_features:
                return torch.empty((*x.shape[:-1], module.out_features), dtype=x.dtype, device=x.device)
        return super().call_module(target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if target in _BINARY and not kwargs and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            a, b = args
            return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"] = _shape_of(result)
        if isinstance(result, torch.Tensor):
            n.meta["dtype"] = result.dtype
        return result


class _Run(nn.Module):
    """Lets functional_call swap the graph module's tensors while an Interpreter walks it."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> Any:
        return _ShapeInterpreter(self.gm).run(*args)


def _on_meta(x: Any) -> Any:
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record each node's output shape in node.meta["shape"], in eval mode, on meta tensors.

    Eval mode avoids the batch-of-one check of training BatchNorm and leaves the running
    statistics alone; the traced graph has already fixed which branches run.
    """
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        run = _Run(gm)
        tensors = {k: _on_meta(v) for k, v in (*run.named_parameters(), *run.named_buffers())}
        try:
            functional_call(run, tensors, tuple(_on_meta(x) for x in example_inputs), strict=False)
        except Exception:  # noqa: BLE001 - no meta kernel, or a leaf that reads values: run it for real
            with torch.no_grad():
                run(*example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training
