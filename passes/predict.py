"""predict: the shapes and FLOPs a plan would leave, from the graph and the channel counts alone.

A shrink sets every typed node's shape from the channels alive on its axes, and slices every
parameter along the axes the analysis bound (passes/shrink.py). The same two facts, computed for
the elements a plan would leave alive, give the model's shapes after the plan without touching a
weight, so a planner can price as many candidate plans as it needs whatever the model's size.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx

from ptgraph.cost import forward_flops
from ptgraph.passes.flow import _current
from ptgraph.passes.groups import ChannelAnalysis
from ptgraph.passes.plan import PrunePlan
from ptgraph.passes.shrink import alive_after


class PlannedShapes:
    """Node and parameter shapes as they would be after `shrink(analysis, plan)`."""

    def __init__(self, analysis: ChannelAnalysis, plan: PrunePlan) -> None:
        flow = analysis.flow
        self.flow = flow
        self.alive = alive_after(analysis, plan) if plan.keep else flow.alive
        self.module = analysis.graph.module
        self._params: dict[str, tuple | None] = {}

    def count(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(self.alive[ids]))

    def node(self, n: Any) -> Any:
        """What shrink would record in n.meta["shape"]."""
        if not isinstance(n, fx.Node):
            return None
        shape = n.meta.get("shape")
        if n in self.flow.types:
            return _current(self.flow.types[n], shape, self.count)
        if n.op == "get_attr" and isinstance(shape, tuple):  # weights read by F.linear & co.: their sliced shape
            return self.param(n.target)
        return shape

    def param(self, name: str) -> tuple | None:
        """A parameter's, buffer's or tensor attribute's shape after the plan (None if there is no such tensor)."""
        if name not in self._params:
            path, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(path) if path else self.module
            value = getattr(owner, attr, None)
            shape = list(value.shape) if hasattr(value, "shape") else None
            axes = self.flow.param_axes.get(self.flow.canonical.get(name, name), {})
            if shape is not None:
                for axis, ids in axes.items():
                    shape[axis] = self.count(ids)
            self._params[name] = None if shape is None else tuple(shape)
        return self._params[name]


def predicted_flops(analysis: ChannelAnalysis, plan: PrunePlan) -> int:
    """Forward FLOPs per sample the model would have after `shrink(analysis, plan)`; nothing is copied or
    sliced (what `forward_flops` counts after the real shrink, exactly)."""
    shapes = PlannedShapes(analysis, plan)
    return forward_flops(analysis.graph.module, shapes.node, shapes.param)
