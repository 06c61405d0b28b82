"""PruneTrain as a small object that fits into any PyTorch training loop.

    pt = PruneTrain(model, example_inputs, optimizer)
    model = pt.model                              # the traced graph module: train this one
    for x, y in loader:
        loss = criterion(model(x), y)
        (loss + pt.penalty(loss)).backward()      # zero in proximal mode; calibrates lambda once
        optimizer.step(); optimizer.zero_grad()
        pt.after_step()                           # proximal group soft-thresholding
        if pt.reconfiguration_due():
            pt.reconfigure()                      # model and optimizer shrunk in place
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ptgraph.cost import forward_flops
from ptgraph.graph import Graph, trace
from ptgraph.passes import ChannelAnalysis, PrunePlan, ShrinkReport, analyze_channels, keep_every_tensor, shrink
from ptgraph.trainers.lasso import ChannelIndex, build_index, channel_sq_norms, group_lasso, proximal_step


@dataclass(frozen=True)
class Reconfiguration:
    step: int
    plan: PrunePlan
    report: ShrinkReport
    flops_before: int  # forward FLOPs per sample
    flops_after: int
    seconds: float


def lasso_lambda(task_loss: float, lasso: float, ratio: float) -> float:
    """lambda such that lambda*R0 / (L0 + lambda*R0) == ratio (the paper's penalty ratio)."""
    assert 0 <= ratio < 1
    return ratio * task_loss / (lasso * (1 - ratio)) if lasso > 0 else 0.0


def keep_channels(norms: np.ndarray, threshold: float, round_to: int, extra: float = 0.0) -> np.ndarray:
    """Indices to keep: norms at or over threshold, plus `extra` of the others, rounded up to a multiple
    of round_to (largest norms win), never fewer than one rounding unit (or the whole group, if smaller)."""
    size = len(norms)
    n = int((norms >= threshold).sum())
    n += math.ceil(extra * (size - n))
    unit = max(1, round_to)
    n = min(size, max(unit, math.ceil(n / unit) * unit))
    return np.sort(np.argsort(-norms, kind="stable")[:n])


class PruneTrain:
    """Group-lasso regularisation over the model's channel groups, and shrinking while it trains."""

    def __init__(
        self,
        model: nn.Module | Graph,
        example_inputs: Any,
        optimizer: torch.optim.Optimizer | None,
        *,
        penalty_ratio: float = 0.2,
        threshold: float = 1e-4,
        reconfig_steps: int | None = None,
        round_to: int = 1,
        proximal: bool = True,
        exact_only: bool = False,
        prox_every: int = 1,
        target_flops: float | None = None,
        leaf_modules: Iterable[str | type] = (),
        ignore: Iterable[str] = (),
    ) -> None:
        self.graph = model if isinstance(model, Graph) else trace(model, example_inputs, leaf_modules, ignore)
        self.analysis: ChannelAnalysis = analyze_channels(self.graph)
        self.optimizer = optimizer
        self.penalty_ratio = penalty_ratio
        self.threshold = threshold
        self.reconfig_steps = reconfig_steps
        self.round_to = round_to
        self.proximal = proximal
        self.exact_only = exact_only
        self.prox_every = prox_every
        self.target_flops = target_flops  # share of the dense forward FLOPs at which pruning stops
        self._capped = False
        self._pending = 0.0  # proximal strength (sum of lr * lambda) not applied yet
        self.lam: float | None = None
        self.steps = 0
        self.plans: list[PrunePlan] = []
        self.dense_flops = self._flops = forward_flops(self.model)
        self._index: ChannelIndex | None = None

    @property
    def model(self) -> nn.Module:
        """The module to train and export: the traced graph module, sharing the user's parameters."""
        return self.graph.module

    @property
    def flops(self) -> int:
        """Forward FLOPs per sample of the model as it is now."""
        return self._flops

    @property
    def channels(self) -> dict[int, int]:
        """Channels now kept in every prunable group."""
        return {g.id: g.size for g in self.analysis.groups if g.prunable}

    def _groups(self) -> tuple:
        return tuple(g for g in self.analysis.groups if g.prunable and (g.exact or not self.exact_only))

    @property
    def index(self) -> ChannelIndex:
        if self._index is None:
            device = next(self.model.parameters()).device
            self._index = build_index(self._groups(), self.model, device)
        return self._index

    def lasso(self) -> torch.Tensor:
        """The group lasso: sum of every prunable channel's L2 norm over all its member slices."""
        return group_lasso(self.index, self.model)

    def penalty(self, task_loss: torch.Tensor) -> torch.Tensor:
        """lambda * group lasso to add to the loss (zero in proximal mode); sets lambda at the first call."""
        if self.lam is None:
            with torch.no_grad():
                self.lam = lasso_lambda(float(task_loss.detach()), float(self.lasso()), self.penalty_ratio)
        if self.proximal or self.lam == 0:
            return task_loss.new_zeros(())
        return self.lam * self.lasso()

    def after_step(self) -> None:
        """Call after optimizer.step(): counts the step and, in proximal mode, soft-thresholds channels
        (every `prox_every` steps, with the strength of all of them: on a GPU a small model's step is
        launch-bound, and the thresholding is a few kernels per layer)."""
        self.steps += 1
        if self.proximal and self.lam:
            self._pending += self.optimizer.param_groups[0]["lr"] * self.lam
            if self.steps % self.prox_every == 0:
                self.flush()

    def flush(self) -> None:
        """Apply the proximal strength accumulated since the last thresholding."""
        if self._pending:
            proximal_step(self.index, self.model, self._pending)
            self._pending = 0.0

    def reconfiguration_due(self) -> bool:
        return bool(self.reconfig_steps) and self.steps > 0 and self.steps % self.reconfig_steps == 0

    @torch.no_grad()
    def channel_norms(self) -> dict[int, np.ndarray]:
        """Every prunable group's channel norms (L2 over all member slices)."""
        norms = channel_sq_norms(self.index, self.model).sqrt().float().cpu().numpy()
        return {gid: norms[s] for gid, s in self.index.group_slices.items()}

    @property
    def target_reached(self) -> bool:
        """With a FLOPs target: a plan was capped at it, so the lasso is off and nothing more is removed."""
        return self.target_flops is not None and self.lam == 0.0

    def plan(self) -> PrunePlan:
        """The channels to keep: norm at or over the threshold (rounded as configured), after any pending
        thresholding; with a FLOPs target, never below it."""
        self.flush()
        if self.target_reached:
            return PrunePlan({})
        norms = self.channel_norms()
        plan = self._plan(norms, 0.0)
        if self.target_flops is None or not plan.keep:
            return plan
        floor = self.target_flops * self.dense_flops
        if self.flops_after(plan) >= floor:
            return plan
        lo, hi = 0.0, 1.0  # share of the under-threshold channels put back: 1.0 keeps every channel
        for _ in range(10):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if self.flops_after(self._plan(norms, mid)) >= floor else (mid, hi)
        self._capped = True
        return self._plan(norms, hi)

    def _plan(self, norms: dict[int, np.ndarray], restore: float) -> PrunePlan:
        """The threshold plan with `restore` of each group's under-threshold channels kept after all
        (largest norms first)."""
        keep = {}
        for gid, n in norms.items():
            kept = keep_channels(n, self.threshold, self.round_to, restore)
            if len(kept) < len(n):
                keep[gid] = tuple(kept.tolist())
        return keep_every_tensor(self.analysis, PrunePlan(keep), norms)

    def flops_after(self, plan: PrunePlan) -> int:
        """Forward FLOPs per sample the model would have after `plan` (shrinks a copy; the model is untouched)."""
        graph = copy.deepcopy(self.graph)
        analysis = analyze_channels(graph)
        assert [(g.id, g.size) for g in analysis.groups] == [(g.id, g.size) for g in self.analysis.groups]
        shrink(analysis, plan, None)
        return forward_flops(graph.module)

    def reconfigure(self, plan: PrunePlan | None = None) -> Reconfiguration | None:
        """Remove the channels under the threshold from model and optimizer, in place; None if none are."""
        start = time.perf_counter()
        plan = plan if plan is not None else self.plan()
        if self._capped:
            self.lam, self._capped = 0.0, False  # at the target: the rest of training is plain training
        if not plan.keep:
            return None
        before = self.flops
        report = shrink(self.analysis, plan, self.optimizer)
        self._index = None
        self._flops = forward_flops(self.model)
        self.plans.append(plan)
        return Reconfiguration(self.steps, plan, report, before, self.flops, time.perf_counter() - start)
