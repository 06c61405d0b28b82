"""How much of the model's function the next cut of each channel group would take, per FLOP it saves.

The `sensitivity` allocation spreads each cut over the groups like `uniform`, tilted by this measure:
a group whose next channels change the output little for the FLOPs they cost is cut faster, one whose
next channels matter is cut slower. The uniform and global allocations set the network's shape without
looking at what it computes (the same share everywhere; norms relative to each group's), and each suits
one of section 1's two CIFAR models and fails the other (docs/DESIGN_NOTES.md, PruneTrain); measuring
the function is the model's own answer to the shape. Which channels of a group go stays the lasso's.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from ptgraph.graph import Graph
from ptgraph.passes import ChannelAnalysis, PrunePlan
from ptgraph.passes.shrink import keep_every_tensor
from ptgraph.passes.trial import eval_mode, masked_output
from ptgraph.passes.verify import flat_output

CHUNK = 0.1  # share of a group's dense channels whose removal is measured
MAX_TILT = 2.0  # a group's kept share is scaled by at most this much either way against uniform's


@torch.no_grad()
def output_change(graph: Graph, analysis: ChannelAnalysis, plans: dict[int, PrunePlan], inputs: tuple) -> dict[int, float]:
    """Per group: the squared change of the model's output (eval mode, `inputs`) when its plan is applied as a
    mask, relative to the output's squared norm. The masks go on the model in place and are undone
    (passes/trial.py: `masked_output`), so nothing is copied and the model ends as it was."""
    restore_modes = eval_mode(graph.module)
    try:
        want = flat_output(graph.module(*inputs))
        scale = float((want ** 2).sum()) or 1.0
        out = {}
        for gid, plan in plans.items():
            got = masked_output(analysis, plan, inputs, flat_output)
            out[gid] = float(((got - want) ** 2).sum()) / scale if got.shape == want.shape else float("inf")
        return out
    finally:
        restore_modes()


def tilts(change: dict[int, float], saved_flops: dict[int, float]) -> dict[int, float]:
    """Per group: (its output change per FLOP saved over the median group's) ** 0.5, clipped to
    [1/MAX_TILT, MAX_TILT]; 1 for every group means the uniform allocation."""
    rate = {g: change[g] / saved_flops[g] for g in change if saved_flops.get(g, 0) > 0}
    live = [r for r in rate.values() if 0 < r < float("inf")]
    if not live:
        return {g: 1.0 for g in change}
    median = float(np.median(live))
    return {g: float(np.clip((rate[g] / median) ** 0.5, 1 / MAX_TILT, MAX_TILT)) if g in rate else MAX_TILT
            for g in change}


def measured_tilts(graph: Graph, analysis: ChannelAnalysis, norms: dict[int, np.ndarray], dense_sizes: dict[int, int],
                   floors: dict[int, int], inputs: tuple, cost: Callable[[int, int], float]) -> dict[int, float] | None:
    """Per group, `tilts` from masking its next CHUNK of dense channels (its smallest norms) on `inputs`, per
    FLOP they save (`cost(group, size)`: one channel's FLOPs); a group at its floor has no next cut and is left
    out. None when no group has one."""
    plans, saved = {}, {}
    for gid, n in norms.items():
        k = max(1, math.ceil(CHUNK * dense_sizes[gid]))
        if len(n) - k >= floors.get(gid, 1):
            keep = np.sort(np.argsort(-n, kind="stable")[:len(n) - k])
            plans[gid] = keep_every_tensor(analysis, PrunePlan({gid: tuple(keep.tolist())}), norms)
            saved[gid] = cost(gid, len(n)) * k
    return tilts(output_change(graph, analysis, plans, inputs), saved) if plans else None


def as_inputs(batch: Any) -> tuple:
    """A training batch's model inputs as a tuple, detached."""
    batch = batch if isinstance(batch, (tuple, list)) else (batch,)
    return tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in batch)
