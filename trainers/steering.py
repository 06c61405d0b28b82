"""How PruneTrain decides what to cut and how hard the lasso presses, as a part of the PruneTrain class: the
budget's plans (the threshold's, put back when ahead of the schedule, the nearest-zero channels at its point;
uniform, global, sensitivity or config allocation) and the steering of lambda and the lasso's weights towards
the schedule's next point. trainers/prunetrain.py holds the object and its reconfiguration."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from ptgraph.passes import PrunePlan
from ptgraph.passes.predict import predicted_flops
from ptgraph.trainers.allocation import relative_norms, uniform_order
from ptgraph.trainers.planning import channel_cost, cost_scores, deepest, norm_cuts, threshold_plan, uniform_plan
from ptgraph.trainers.sensitivity import measured_tilts


class Steering:
    """Methods of PruneTrain (its state: analysis, norms, schedule, controller, allocation, ...)."""

    def _unchecked_plan(self) -> PrunePlan:
        """The channels to keep: norm at or over the threshold (rounded as configured), after any pending
        thresholding. With a target, never under the schedule's FLOPs for this step, and at the schedule's
        point exactly at the target: the channels the lasso has brought closest to zero go first."""
        self.flush()
        if self.budget_done:
            return PrunePlan({})
        norms = self.channel_norms()
        plan = self._plan(norms, self.threshold)
        if self.schedule is None:
            return plan
        goal = self.scheduled_flops
        at_threshold = self.flops_after(plan) if plan.keep else self.flops
        self._feedback = (self.flops, at_threshold, goal)
        if at_threshold < goal:  # ahead of the schedule: put back some of the zeroed channels
            shares = np.linspace(1.0, 0.0, 257)
            return self._deepest(lambda i: self._plan(norms, self.threshold, shares[i]), len(shares), goal)[1]
        if self.steps >= self.schedule.until and at_threshold > goal:  # the point: the nearest-zero channels go
            plan_of, n = self._cut_plans(norms)
            return self._deepest(plan_of, n, goal, nearest=True)[1]
        return plan

    def _cut_plans(self, norms: dict[int, np.ndarray]) -> tuple[Callable[[int], PrunePlan], int]:
        """Plans that remove more as their index grows, for `_deepest`. `global`: one cut on the channels'
        scores across all groups (the smallest relative norms go first, wherever they are). `uniform`: every
        group keeps the same share of its dense channels, its smallest norms going first: the spread of a
        narrower network of the same design (no group becomes a bottleneck the others are not), the lasso
        and the norms choosing the channels within each group. `config`: as uniform, over the widths a config
        holds (trainers/uniform_blocks.py)."""
        if self.blocks is not None:
            from ptgraph.trainers.uniform_blocks import cut_plans

            return cut_plans(self.analysis, self.blocks, norms, self.dense_sizes, self.min_channels)
        if self.allocation in ("uniform", "sensitivity"):
            tilt = self._tilts(norms) if self.allocation == "sensitivity" else None
            order = uniform_order(norms, self.dense_sizes, tilt, self.min_channels if tilt else None)
            return (lambda i: uniform_plan(self.analysis, norms, order[:i], self.round_to)), len(order) + 1
        scores = self._scores(norms)
        cuts = norm_cuts(scores, self.threshold)
        return (lambda i: self._plan(scores, cuts[i])), len(cuts)

    def _tilts(self, norms: dict[int, np.ndarray]) -> dict[int, float] | None:
        """Per group, how much slower (over 1) or faster than uniform its cuts go: the output change its next
        CHUNK of channels (smallest norms) makes on the observed inputs, per FLOP they save (trainers/sensitivity.py).
        None (uniform) before the first interval has trained, or with no inputs observed."""
        if self.steps < (self.reconfig_steps or 1):
            return None
        if self._observed is None:
            if not self._warned_unobserved:
                warnings.warn("ptgraph: the sensitivity allocation has no inputs to measure on; call "
                              "pt.observe(inputs) in the training loop. Cutting uniformly.", stacklevel=4)
                self._warned_unobserved = True
            return None
        return measured_tilts(self.graph, self.analysis, norms, self.dense_sizes, self.min_channels, self._observed,
                              self._channel_cost)

    def _plan(self, norms: dict[int, np.ndarray], cut: float, restore: float = 0.0) -> PrunePlan:
        plan = threshold_plan(self.analysis, norms, cut, self.round_to, self.min_channels, restore)
        if self.blocks is None:
            return plan
        from ptgraph.trainers.uniform_blocks import expressible  # keeps what a config can express: more, never less

        return expressible(self.analysis, self.blocks, plan, norms)

    def _deepest(self, plan_of: Callable[[int], PrunePlan], n: int, floor: float,
                 nearest: bool = False) -> tuple[int, PrunePlan]:
        return deepest(plan_of, n, floor, self.flops_after, nearest)

    def flops_after(self, plan: PrunePlan) -> int:
        """Forward FLOPs per sample the model would have after `plan` (counted from the channels it leaves;
        nothing is copied or touched)."""
        return predicted_flops(self.analysis, plan) if plan.keep else self.flops

    def _steered_lambda(self) -> float:
        """lambda and the lasso's weights for the next interval. The channels the schedule's next point needs
        gone carry the lasso, the others weight 0: those with the smallest norm relative to their group's
        (raw norms would take whole groups whose scale happens to be small: a residual stream's norm sums
        more members than a block's), found as the plan that meets that point's FLOPs. Each is weighted by
        its norm and lambda is set so that, unopposed, all of them decay linearly to exactly zero by that
        point (feed-forward), times the controller's gain (the feedback: the gradient defends channels the
        network uses, and a defended channel stays until the gain overcomes it)."""
        assert self.schedule is not None
        nxt = min(self.schedule.until, (self.steps // self.reconfig_steps + 1) * self.reconfig_steps)
        goal = self.schedule.share_at(nxt) * self.dense_flops
        self.cut_norm = 0.0
        if self.steps >= self.schedule.until or self.flops <= goal:
            self._set_weights(None)
            return 0.0
        norms = self.channel_norms()
        plan_of, n = self._cut_plans(norms)
        _, plan = self._deepest(plan_of, n, goal)
        going = np.zeros(self.index.n_slots, dtype=bool)
        flat = np.zeros(self.index.n_slots, dtype=np.float32)
        for gid, n in norms.items():
            mask = np.ones(len(n), dtype=bool)
            mask[list(plan.keep.get(gid, range(len(n))))] = False
            going[self.index.group_slices[gid]] = mask & (n >= self.threshold)
            flat[self.index.group_slices[gid]] = n
        self.cut_norm = float(flat[going].max(initial=0.0))
        self._set_weights(np.where(going, flat / max(self.cut_norm, 1e-30), 0.0))
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else 0.0
        return self.controller.strength(self.cut_norm, lr, nxt - self.steps)

    def _scores(self, norms: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """What decides which channels are pressed and cut under `global`: norms relative to their group's, with
        `compute_aware` divided by what one channel of the group costs (trainers/planning.py)."""
        if not self.compute_aware:
            return relative_norms(norms)
        return cost_scores(norms, {gid: self._channel_cost(gid, len(n)) for gid, n in norms.items()})

    def _channel_cost(self, gid: int, size: int) -> float:
        return channel_cost(self.analysis, gid, size, self.flops)

    def _set_weights(self, weights: np.ndarray | None) -> None:
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self._weights_on_device = None

    def _steer(self) -> None:
        """After a reconfiguration this object planned: update the gain from what the lasso achieved, set lambda
        for the next interval, and switch the lasso off at the schedule's point."""
        before, at_threshold, goal = self._feedback
        self._feedback = None
        if self.steps >= self.schedule.until:
            self.lam, self.budget_done = 0.0, True
            return
        self.controller.feedback(asked=before - goal, achieved=before - at_threshold)
        self.lam = self._steered_lambda()

    def budget_state(self) -> dict[str, Any]:
        """What a checkpoint (or rank 0) must carry so that the steering goes on identically."""
        return {"lam": self.lam, "done": self.budget_done, "weights": self.weights, "frozen": sorted(self.frozen),
                **self.controller.state_dict()}

    def load_budget_state(self, state: dict[str, Any]) -> None:
        self.lam, self.budget_done = state["lam"], state["done"]
        if set(state.get("frozen", ())) != self.frozen:
            self.frozen, self._index = set(state.get("frozen", ())), None
        self._set_weights(state["weights"])
        self.controller.load_state_dict(state)
