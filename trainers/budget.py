"""A FLOPs budget for PruneTrain: where the model's cost should be at each step, and a lasso strength steered there.

The user gives one number, the share F of the dense forward FLOPs to end with, and the point of
training by which to reach it. `FlopsSchedule` says what the cost should be at every step (dense at
the start, F at the point, cubic by default: fast while the network is plastic, gentle near the end,
as in gradual pruning). `LassoController` sets the proximal strength for the next interval from the
channel norms themselves: to bring the schedule's next share of channels to zero in `n` steps at
learning rate `lr`, soft-thresholding must take off the norm of the last of them, `x`, so
lambda = gain * x / (lr * n). The gain is the feedback: the gradient pulls channels back, so after
each interval it grows when fewer FLOPs were at zero than asked and shrinks when more were. The
strength is thus in units of the model's own channel norms: the same target means the same on every
model, and no ratio has to be guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ptgraph.errors import UserError

SHAPES = ("cubic", "linear")
ALLOCATIONS = ("uniform", "global", "sensitivity", "config")
# docs/BENCHMARKS.md section 1, target 0.5: uniform is 4.5 (10 epochs, two seeds) and 4.7 (20 epochs) points better
# on MobileNetV2, the worse model, and 0.8 worse on ResNet-20 than global; compute-aware scores rank across groups,
# so they imply global.
DEFAULT_ALLOCATION = "uniform"
# Section 1, 20 epochs, seed 0, target 0.5: by 30% of the steps MobileNetV2 +0.48 and ResNet-20 -1.72 against dense,
# by 50% -3.07 and -1.38 (and 55% of the dense training FLOPs against 58%): 0.3 is better on the worse model.
# (Seed 1 at 0.3: MobileNetV2 -4.32, ResNet-20 -1.60; MobileNetV2 moves about 2-3 points between seeds.)
DEFAULT_PRUNE_UNTIL = 0.3


def resolve_allocation(allocation: str | None, compute_aware: bool = False) -> str:
    """The allocation a run uses: the one given, else global with compute-aware scores, else the default."""
    return allocation if allocation is not None else "global" if compute_aware else DEFAULT_ALLOCATION


@dataclass(frozen=True)
class FlopsSchedule:
    """Share of the dense forward FLOPs the model should have after `step`: 1 at step 0, `target` from `until` on."""

    target: float
    until: int  # the step by which the target is reached
    shape: str = "cubic"

    def share_at(self, step: int) -> float:
        progress = min(1.0, max(0.0, step / max(self.until, 1)))
        left = (1 - progress) ** 3 if self.shape == "cubic" else 1 - progress
        return self.target + (1 - self.target) * left


def check_budget(target: float, until: float, shape: str, reconfigurations: int, allocation: str | None = None,
                 compute_aware: bool = False) -> None:
    """One line per value a user can give wrong (the CLI and the Python object share these)."""
    if not 0 < target <= 1:
        raise UserError(f"--target-flops {target:g} is outside (0, 1]; give the share of the dense FLOPs to keep, e.g. 0.5")
    if not 0 < until <= 1:
        raise UserError(f"--prune-until {until:g} is outside (0, 1]; give the share of the training steps by which "
                        f"to reach the target, e.g. 0.3")
    if shape not in SHAPES:
        raise UserError(f"--prune-schedule must be one of {', '.join(SHAPES)}, not {shape}")
    if reconfigurations < 1:
        raise UserError("--reconfigurations must be 1 or more")
    allocation = resolve_allocation(allocation, compute_aware)
    if allocation not in ALLOCATIONS:
        raise UserError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, not {allocation}")
    if compute_aware and allocation != "global":
        raise UserError("--compute-aware ranks channels across groups; it applies with --allocation global only")


@dataclass
class LassoController:
    """The feedback half of the steering: a gain on the feed-forward strength, kept in the checkpoint."""

    gain: float = 1.0
    min_gain: float = 0.05
    max_gain: float = 100.0

    def feedback(self, asked: float, achieved: float) -> None:
        """`asked`: FLOPs the schedule wanted gone over the last interval; `achieved`: FLOPs the lasso brought
        to zero. Multiplicative and damped, so one noisy interval cannot swing the strength by more than 3x."""
        if asked <= 0:
            return
        ratio = min(3.0, max(0.5, asked / max(achieved, 1e-9 * asked)))
        self.gain = min(self.max_gain, max(self.min_gain, self.gain * ratio ** 0.7))

    def strength(self, cut_norm: float, lr: float, steps: int) -> float:
        """lambda that, unopposed, brings every channel of norm up to `cut_norm` to zero in `steps` steps at `lr`."""
        if cut_norm <= 0 or lr <= 0 or steps <= 0:
            return 0.0
        return self.gain * cut_norm / (lr * steps)

    def state_dict(self) -> dict[str, Any]:
        return {"gain": self.gain}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gain = float(state["gain"])


def interval_steps(until: int, reconfigurations: int) -> int:
    """Steps between reconfigurations so that the last of them falls on the schedule's point (or just before)."""
    return max(1, math.floor(until / reconfigurations))
