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


class _ShapeInterpreter(fx.Interpreter):
    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(self.fetch_attr(target), _SAME_SHAPE_MODULES) and len(args) == 1 and not kwargs \
                and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
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
