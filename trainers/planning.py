"""Plans that meet a FLOPs goal: candidate plans from the channel norms, their exact FLOPs, the deepest one over
a floor. Data in, plans out; the model is never touched and no weight is copied (a plan's FLOPs come from the
channel counts it leaves, passes/predict.py), so the steering and the schedule's final cut can try as many plans
as a bisection needs, whatever the model's size."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable

import numpy as np

from ptgraph.passes import ChannelAnalysis, PrunePlan, keep_every_tensor
from ptgraph.passes.predict import predicted_flops
from ptgraph.cost import forward_flops
from ptgraph.trainers.allocation import keep_channels, relative_norms, uniform_order


def threshold_plan(analysis: ChannelAnalysis, norms: dict[int, np.ndarray], cut: float, round_to: int,
                   floors: dict[int, int], restore: float = 0.0) -> PrunePlan:
    """Keep the channels with a norm at or over `cut`, plus `restore` of each group's others (largest norms
    first), no group under its entry in `floors`, rounded to `round_to`; no tensor is emptied."""
    keep = {}
    for gid, n in norms.items():
        kept = keep_channels(n, cut, round_to, restore, floors.get(gid, 1))
        if len(kept) < len(n):
            keep[gid] = tuple(kept.tolist())
    return keep_every_tensor(analysis, PrunePlan(keep), norms)


def uniform_plan(analysis: ChannelAnalysis, norms: dict[int, np.ndarray], removals: list[int],
                 round_to: int) -> PrunePlan:
    """Every group without as many of its smallest norms as `removals` names it (never emptied)."""
    counts = Counter(removals)
    keep = {}
    for gid, n in norms.items():
        if counts[gid]:
            kept = keep_channels(n, math.inf, round_to, 0.0, len(n) - counts[gid])
            if len(kept) < len(n):
                keep[gid] = tuple(kept.tolist())
    return keep_every_tensor(analysis, PrunePlan(keep), norms)


def norm_cuts(norms: dict[int, np.ndarray], threshold: float) -> np.ndarray:
    """Candidate norm cuts, ascending: the threshold, then every channel norm over it."""
    values = np.concatenate([n for n in norms.values()] + [np.zeros(0)])
    return np.unique(np.concatenate([[threshold], values[values > threshold]]))


def channel_cost(analysis: ChannelAnalysis, gid: int, size: int, now: int) -> float:
    """Forward FLOPs per sample one channel of group `gid` costs now (from a plan removing a tenth of it)."""
    k = max(1, size // 10)
    if size <= k:
        return 0.0
    plan = keep_every_tensor(analysis, PrunePlan({gid: tuple(range(k, size))}))
    return (now - predicted_flops(analysis, plan)) / k


def cost_scores(norms: dict[int, np.ndarray], costs: dict[int, float]) -> dict[int, np.ndarray]:
    """Compute-aware scores: each channel's norm relative to its group's, divided by what one channel of its
    group costs (relative to the median group), so that the channels giving the most FLOPs for the least norm
    go first."""
    scores = relative_norms(norms)
    typical = float(np.median([c for c in costs.values() if c > 0] or [1.0]))
    return {gid: n * typical / max(costs[gid], 1e-9 * typical) for gid, n in scores.items()}


def deepest(plan_of: Callable[[int], PrunePlan], n: int, floor: float, flops_of: Callable[[PrunePlan], int],
            nearest: bool = False) -> tuple[int, PrunePlan]:
    """plan_of(i) removes more as i grows: the largest i (and its plan) whose plan keeps at least `floor`
    FLOPs, or 0 (bisection on `flops_of`, a plan's exact FLOPs). With `nearest`, the next deeper
    plan instead when it lands closer to `floor` (coarse groups: one channel may be a big step)."""
    lo, hi = 0, n - 1
    if flops_of(plan_of(hi)) >= floor:
        return hi, plan_of(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if flops_of(plan_of(mid)) >= floor else (lo, mid)
    if nearest and floor - flops_of(plan_of(hi)) < flops_of(plan_of(lo)) - floor:
        return hi, plan_of(hi)
    return lo, plan_of(lo)


def shape_plan(analysis: ChannelAnalysis, share: float, round_to: int = 1) -> tuple[PrunePlan, int]:
    """A plan of shapes alone, for a model whose weights do not exist yet (built on the meta device) or are
    not wanted: every prunable group keeps the same share of its channels (its first ones, as there are no
    norms to rank them), the deepest such plan at or over `share` of the FLOPs now. Returns the plan and its
    forward FLOPs per sample. Training chooses the channels by their norms; this prices a target."""
    zeros = {g.id: np.zeros(g.size) for g in analysis.groups if g.prunable}
    order = uniform_order(zeros, {gid: len(n) for gid, n in zeros.items()})
    now = forward_flops(analysis.graph.module)

    def flops_of(plan: PrunePlan) -> int:
        return predicted_flops(analysis, plan) if plan.keep else now

    _, plan = deepest(lambda i: uniform_plan(analysis, zeros, order[:i], round_to), len(order) + 1, share * now,
                      flops_of)
    return plan, flops_of(plan)

