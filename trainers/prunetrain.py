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

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ptgraph.cost import forward_flops
from ptgraph.errors import UserError
from ptgraph.graph import Graph, trace
from ptgraph.passes import ChannelAnalysis, PrunePlan, ShrinkReport, analyze_channels, shrink
from ptgraph.passes.trial import checked_shrink
from ptgraph.passes.verify import failing_groups, flat_output, tolerance_for
from ptgraph.trainers.budget import DEFAULT_PRUNE_UNTIL, FlopsSchedule, LassoController, check_budget, interval_steps, resolve_allocation
from ptgraph.trainers.distributed import Dist, current
from ptgraph.trainers.lasso import ChannelIndex, build_index, channel_sq_norms, group_lasso, proximal_step
from ptgraph.trainers.sensitivity import as_inputs
from ptgraph.trainers.steering import Steering

DEFAULT_RATIO = 0.2  # the paper's, for its 182 epochs


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


class PruneTrain(Steering):
    """Group-lasso regularisation over the model's channel groups, and shrinking while it trains.

    Two ways to set the lasso's strength. With `target_flops=F` (and `total_steps`, the run's length),
    the model is brought to F x the dense forward FLOPs by `prune_until` of the steps, gradually, along
    a `FlopsSchedule`, the strength steered at every reconfiguration (trainers/budget.py); after that the
    lasso is off and the smaller network trains plainly. Without a target, lambda is fixed at the first
    step so that the penalty is `penalty_ratio` of the loss (the paper's method).
    """

    def __init__(
        self,
        model: nn.Module | Graph,
        example_inputs: Any,
        optimizer: torch.optim.Optimizer | None,
        *,
        penalty_ratio: float | None = None,
        threshold: float = 1e-4,
        reconfig_steps: int | None = None,
        round_to: int = 1,
        proximal: bool = True,
        exact_only: bool = False,
        prox_every: int = 1,
        target_flops: float | None = None,
        total_steps: int | None = None,
        prune_until: float = DEFAULT_PRUNE_UNTIL,
        prune_schedule: str = "cubic",
        reconfigurations: int = 8,
        self_check: bool = True,
        compute_aware: bool = False,
        allocation: str | None = None,
        width_multiple: int = 8,
        leaf_modules: Iterable[str | type] = (),
        ignore: Iterable[str] = (),
    ) -> None:
        self.schedule: FlopsSchedule | None = None
        if target_flops is not None:
            check_budget(target_flops, prune_until, prune_schedule, reconfigurations, allocation, compute_aware)
            if penalty_ratio is not None:
                raise UserError("a FLOPs target steers the lasso strength itself; give either a target or a penalty "
                                "ratio, not both")
            if not proximal:
                raise UserError("a FLOPs target steers the proximal lasso; leave out the subgradient lasso")
            if not total_steps or total_steps < 1:
                raise UserError("a FLOPs target needs total_steps, the run's number of training steps, to place "
                                "its schedule")
            until = max(1, round(prune_until * total_steps))
            if reconfig_steps is None:
                reconfig_steps = interval_steps(until, reconfigurations)
            until = max(reconfig_steps, until // reconfig_steps * reconfig_steps)  # the last reconfiguration's step
            self.schedule = FlopsSchedule(target_flops, until, prune_schedule)
        self.graph = model if isinstance(model, Graph) else trace(model, example_inputs, leaf_modules, ignore)
        if any(p.is_meta for p in self.graph.module.parameters()):
            raise UserError("the model's parameters are on the meta device (shapes without values), and PruneTrain "
                            "needs values for the lasso, the channel norms and the self-check; price a plan with "
                            "ptgraph.trainers.planning.shape_plan(analysis, share) instead, or materialise the model "
                            "first (model.to_empty(device=...), then load its weights)")
        self.probe = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.self_check = self_check  # every plan is tried on a copy against its mask before it is kept
        self.frozen: set[int] = set()  # groups whose shrink failed that check: never pruned again in this run
        self.check_note: str | None = None  # what the last check froze, one line
        self.check_seconds = 0.0
        self.analysis: ChannelAnalysis = analyze_channels(self.graph)
        self.optimizer = optimizer
        self.penalty_ratio = DEFAULT_RATIO if penalty_ratio is None and target_flops is None else penalty_ratio
        self.threshold = threshold
        self.reconfig_steps = reconfig_steps
        self.round_to = round_to
        self.proximal = proximal
        self.exact_only = exact_only
        self.prox_every = prox_every
        self.target_flops = target_flops  # share of the dense forward FLOPs to end with
        self.controller = LassoController()
        self.compute_aware = compute_aware  # with a target: press the channels with the least norm per FLOP first
        self.allocation = resolve_allocation(allocation, compute_aware)  # with a target: how each cut is spread (see `_cut_plans`)
        self.budget_done = False  # the schedule's point is past: the lasso is off, nothing more is removed
        self.weights: np.ndarray | None = None  # per channel slot, with a target: the adaptive lasso's weights
        self._weights_on_device: torch.Tensor | None = None
        self.cut_norm = 0.0  # the channel norm the schedule needs at zero by its point, at the last steering
        self._feedback: tuple[int, int, float] | None = None  # (FLOPs before, at the threshold, goal) of the last plan
        self._pending = 0.0  # proximal strength (sum of lr * lambda) not applied yet
        self.lam: float | None = None
        self.steps = 0
        self.plans: list[PrunePlan] = []
        self.dense_flops = self._flops = forward_flops(self.model)
        self.dense_sizes = {g.id: g.size for g in self.analysis.groups if g.prunable}
        # With a target F, no group is cut below F of its dense channels: left alone, the steering ratchets a few
        # high-resolution groups down to 2-3 channels (their survivors' median rises, so the rest look small).
        self.min_channels = ({gid: math.ceil(target_flops * size) for gid, size in self.dense_sizes.items()}
                             if target_flops is not None else {})
        self._index: ChannelIndex | None = None
        self._observed: tuple | None = None  # the last training inputs `observe` was given (sensitivity allocation)
        self._warned_unobserved = False
        self.blocks = None  # allocation "config": the widths a config holds, each cut alike in every block
        self.values: nn.Module | None = None  # FSDP2 (trainers/fsdp.py): the sharded module holding the values
        self.sharded = None  # FSDP2: the trainers.fsdp.Sharded that reconfigures; `model` is then a meta skeleton
        if self.allocation == "config":
            from ptgraph.trainers.uniform_blocks import config_blocks

            self.blocks = config_blocks(self.analysis, model, width_multiple)
            self.frozen |= self.blocks.outside  # no config width holds them: left whole, no lasso

    @property
    def model(self) -> nn.Module:
        """The module to train and export: the traced graph module, sharing the user's parameters."""
        return self.graph.module

    @property
    def flops(self) -> int:
        """Forward FLOPs per sample of the model as it is now."""
        return self._flops

    @property
    def scheduled_flops(self) -> int | None:
        """With a target: the forward FLOPs per sample the schedule asks for at this step."""
        return None if self.schedule is None else round(self.schedule.share_at(self.steps) * self.dense_flops)

    @property
    def channels(self) -> dict[int, int]:
        """Channels now kept in every prunable group."""
        return {g.id: g.size for g in self.analysis.groups if g.prunable}

    def _groups(self) -> tuple:
        return tuple(g for g in self.analysis.groups
                     if g.prunable and (g.exact or not self.exact_only) and g.id not in self.frozen)

    @property
    def index(self) -> ChannelIndex:
        if self._index is None:
            device = self._device()
            self._index = build_index(self._groups(), self.model, device)
        return self._index

    def lasso(self) -> torch.Tensor:
        """The group lasso: sum of every prunable channel's L2 norm over all its member slices."""
        return group_lasso(self.index, self._values())

    def calibrate(self, task_loss: float) -> float:
        """The first lambda: from the loss and the penalty ratio, or, with a target, steered to the schedule."""
        if self.schedule is not None:
            return self._steered_lambda()
        with torch.no_grad():
            return lasso_lambda(task_loss, float(self.lasso()), self.penalty_ratio)

    def penalty(self, task_loss: torch.Tensor) -> torch.Tensor:
        """lambda * group lasso to add to the loss (zero in proximal mode); sets lambda at the first call."""
        if self.lam is None:
            self.lam = self._first_lambda(float(task_loss.detach()))
        if self.proximal or self.lam == 0:
            return task_loss.new_zeros(())
        return self.lam * self.lasso()

    def after_step(self) -> None:
        """Call after optimizer.step(): counts the step and, in proximal mode, soft-thresholds channels
        (every `prox_every` steps, with the strength of all of them: on a GPU a small model's step is
        launch-bound, and the thresholding is a few kernels per layer)."""
        self.steps += 1
        if self.lam is None and self.schedule is not None:
            self.lam = self._first_lambda(0.0)
        if self.proximal and self.lam:
            self._pending += self.optimizer.param_groups[0]["lr"] * self.lam
            if self.steps % self.prox_every == 0:
                self.flush()

    def flush(self) -> None:
        """Apply the proximal strength accumulated since the last thresholding."""
        if self._pending:
            if self.weights is not None and self._weights_on_device is None:
                self._weights_on_device = torch.as_tensor(self.weights, device=self.index.slots.device)
            proximal_step(self.index, self._values(), self._pending, self._weights_on_device)
            self._pending = 0.0

    def observe(self, *inputs: Any) -> None:
        """The model inputs of a recent training step (kept by reference): the `sensitivity` allocation measures
        on the last ones given before a reconfiguration. A no-op for the other allocations."""
        if self.allocation == "sensitivity":
            self._observed = as_inputs(inputs)

    def reconfiguration_due(self) -> bool:
        if not self.reconfig_steps or self.steps == 0 or self.budget_done:
            return False
        return self.steps % self.reconfig_steps == 0

    @torch.no_grad()
    def channel_norms(self) -> dict[int, np.ndarray]:
        """Every prunable group's channel norms (L2 over all member slices)."""
        norms = channel_sq_norms(self.index, self._values()).sqrt().float().cpu().numpy()
        return {gid: norms[s] for gid, s in self.index.group_slices.items()}

    @property
    def target_reached(self) -> bool:
        """With a FLOPs target: the schedule's point has passed, so the lasso is off and nothing more is removed."""
        return self.budget_done

    def plan(self) -> PrunePlan:
        """The channels to keep, checked: a group whose shrink would change the model's function is left out
        and frozen for the rest of the run (see `_checked`)."""
        return self._checked(self._unchecked_plan())

    def _checked(self, plan: PrunePlan) -> PrunePlan:
        """Before a shrink is kept, the model shrunk by the plan must compute what the model masked by it computes
        (eval mode, the example inputs; for inexact groups: must run; tried in place and undone, passes/trial.py). On a mismatch the groups that cause it (tried one by one) are dropped
        from the plan and frozen; `check_note` names them."""
        self.check_note = None
        if not self.self_check or not plan.keep:
            return plan
        start = time.perf_counter()
        tolerance = tolerance_for(self.model)
        bad, err = failing_groups(self.analysis, plan, self._probe_on_device(), tolerance)
        if bad:
            self.freeze_failing(bad, err, tolerance)
            warnings.warn(f"ptgraph: {self.check_note}", stacklevel=3)
            plan = PrunePlan({g: k for g, k in plan.keep.items() if g not in bad})
        self.check_seconds += time.perf_counter() - start
        return plan

    def freeze_failing(self, bad: Iterable[int], err: float, tolerance: float) -> None:
        """Groups whose shrink failed the self-check: frozen for the rest of the run (no lasso, never planned),
        named in `check_note`."""
        bad = set(bad)
        self.frozen.update(bad)
        self._index = None
        self._set_weights(None)
        self.check_note = (f"self-check: shrinking group(s) {', '.join(f'g{g}' for g in sorted(bad))} would change "
                           f"the model (relative error {err:.2g} > {tolerance:g}); they stay as they are and are "
                           f"frozen for the rest of the run")

    def _shrink_checked(self, plan: PrunePlan) -> tuple[PrunePlan, ShrinkReport | None]:
        """Shrink by `plan` with the self-check of `_checked`, fused with the shrink itself: the model is masked
        and run, then shrunk and run, in place (passes/trial.py), so a passing plan costs one slicing and two
        forwards and no copy of the model. On a mismatch the shrink is undone and `_checked`'s search decides."""
        self.check_note = None
        if not self.self_check or not plan.keep:
            return plan, (shrink(self.analysis, plan, self.optimizer) if plan.keep else None)
        report, _, seconds = checked_shrink(self.analysis, plan, self._probe_on_device(), flat_output,
                                            tolerance_for(self.model), self.optimizer)
        self.check_seconds += seconds
        if report is not None:
            return plan, report
        plan = self._checked(plan)
        return plan, (shrink(self.analysis, plan, self.optimizer) if plan.keep else None)

    def _values(self) -> nn.Module:
        """The module whose parameters hold the values: the model, or under FSDP2 its sharded copy."""
        return self.model if self.values is None else self.values

    def _device(self) -> torch.device:
        p = next(self._values().parameters())
        return p.device if not hasattr(p, "device_mesh") else torch.device(p.device_mesh.device_type)

    def _probe_on_device(self) -> tuple:
        device = self._device()
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in self.probe)

    def _world(self) -> Dist:
        """The process group torchrun or Lightning initialised, if any: plans and the lasso's strength are then
        decided on rank 0 and broadcast, so every rank shrinks alike (float noise could tip a threshold)."""
        return current(self._device())

    def _first_lambda(self, task_loss: float) -> float:
        """`calibrate`; across ranks, from the mean loss, decided on rank 0 (with its lasso weights) for all."""
        world = self._world()
        if not world.active:
            return self.calibrate(task_loss)
        (mean,) = world.sum(task_loss / world.world)
        if world.main or self.sharded is not None:  # FSDP2: the norms are a collective, every rank computes
            self.lam = self.calibrate(mean)
        self.load_budget_state(world.broadcast_object(self.budget_state()))
        return self.lam

    def reconfigure(self, plan: PrunePlan | None = None) -> Reconfiguration | None:
        """Remove the channels under the threshold from model and optimizer, in place; None if none are.
        A plan passed in (a replay, or rank 0's under torchrun) is applied as it is, without steering.
        Without one, under an initialised process group, rank 0 plans and every rank applies its plan: the
        same Reconfiguration (or None) on every rank tells the loop to rebuild DDP and recompile."""
        if self.sharded is not None:  # FSDP2: every rank together (trainers/fsdp.py)
            return self.sharded.reconfigure(plan)
        start = time.perf_counter()
        world = self._world() if plan is None else None
        distributed = world is not None and world.active
        before = self.flops
        if plan is None and (not distributed or world.main):
            plan, report = self._shrink_checked(self._unchecked_plan())
            if distributed:
                world.broadcast_plan(plan)
        else:
            if distributed:
                self.flush()  # what rank 0's planning does first
                plan = world.broadcast_plan(None)
            report = shrink(self.analysis, plan, self.optimizer) if plan.keep else None
        r = None
        if report is not None:
            self._index = None
            self._flops = forward_flops(self.model)
            self.plans.append(plan)
            r = Reconfiguration(self.steps, plan, report, before, self.flops, time.perf_counter() - start)
        if self._feedback is not None:
            self._steer()
        if world is not None and world.active:  # rank 0 checked and steered: its lambda, gain, weights, frozen groups
            self.load_budget_state(world.broadcast_object(self.budget_state()))
        return r
