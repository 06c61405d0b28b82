"""verify: prune a random share of every exact group and check shrink against mask on random input."""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ptgraph.cost import forward_flops
from ptgraph.passes.groups import ChannelAnalysis
from ptgraph.passes.plan import PrunePlan
from ptgraph.passes.plan import random_plan
from ptgraph.passes.shrink import count_params, keep_every_tensor, mask, predict_params, shrink
from ptgraph.passes.trial import eval_mode, relative_error, shrunk_and_masked

TOLERANCE = 1e-4  # relative, float32


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rel_err: float
    max_abs_err: float
    params_before: int
    params_after: int
    params_predicted: int
    flops_before: int
    flops_after: int
    groups_pruned: int
    shrink_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_output(out: Any) -> torch.Tensor:
    """Every tensor of a model output (nested tuples, lists, dicts), flattened into one float64 vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [flat_output(o) for o in out if o is not None]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.double)
    return torch.zeros(0, dtype=torch.double)


def exercise_zero_params(module: nn.Module, seed: int = 0) -> None:
    """Give all-zero weights (zero-initialised heads, layer scales) random values so every path is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got - want).abs()
    max_abs = float(diff.max()) if len(diff) else 0.0
    scale = float(want.norm())
    return (float((got - want).norm()) / scale if scale > 0 else max_abs), max_abs


def tolerance_for(module: nn.Module) -> float:
    """Relative error a correct shrink stays under: float32 on the CPU; TF32 convolutions on CUDA; half types."""
    p = next(module.parameters(), None)
    if p is None or p.dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return TOLERANCE if p.device.type == "cpu" else 5e-3


def shrink_error(analysis: ChannelAnalysis, plan: PrunePlan, inputs: tuple, compare: bool = True) -> float:
    """Relative error between the model shrunk by `plan` and the model masked by it, in eval mode on
    `inputs`; inf if the shrink or the shrunk forward fails (without `compare`, 0 if it runs). Tried in place
    and undone (passes/trial.py): the model is left exactly as it was, and the only extra memory is the
    dropped slices that are not zero already."""
    restore_modes = eval_mode(analysis.graph.module)
    try:
        outputs = shrunk_and_masked(analysis, plan, inputs, flat_output, masked=compare)
    finally:
        restore_modes()
    if outputs is None:
        return float("inf")
    return relative_error(*outputs) if compare else 0.0


def failing_groups(analysis: ChannelAnalysis, plan: PrunePlan, inputs: tuple,
                   tolerance: float) -> tuple[list[int], float]:
    """The groups of `plan` whose shrink would change the model's function (tried one by one; all of them if
    none fails alone) and the whole plan's error; ([], 0.0) when it passes. Exact groups must match the mask;
    an inexact group (normalisation statistics) cannot, so its shrunk model only has to run."""
    exact = {g.id for g in analysis.groups if g.exact}

    def wrong(p: PrunePlan) -> float:
        checked = PrunePlan({g: k for g, k in p.keep.items() if g in exact})
        err = shrink_error(analysis, checked, inputs) if checked.keep else 0.0
        if err <= tolerance and len(checked.keep) < len(p.keep) and shrink_error(analysis, p, inputs, False) == float("inf"):
            err = float("inf")
        return err if err > tolerance else 0.0

    err = wrong(plan)
    if not err:
        return [], 0.0
    bad = [g for g, keep in plan.keep.items() if wrong(PrunePlan({g: keep}))]
    return bad or list(plan.keep), err


def verify(analysis: ChannelAnalysis, inputs: tuple, ratio: float = 0.3, seed: int = 0) -> VerifyResult:
    """Shrink `analysis.graph.module` in place by a random plan and compare with the masked original."""
    gm = analysis.graph.module
    was_training = gm.training
    gm.eval()
    try:
        plan = keep_every_tensor(analysis, random_plan(analysis.groups, ratio, seed))
        masked = mask(copy.deepcopy(gm), analysis, plan)
        params_before, flops_before = count_params(gm), forward_flops(gm)
        predicted = predict_params(analysis, plan)
        start = time.perf_counter()
        shrink(analysis, plan)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            got, want = flat_output(gm(*inputs)), flat_output(masked(*inputs))
        rel, max_abs = _rel_err(got, want)
        params_after = count_params(gm)
        ok = got.shape == want.shape and rel <= TOLERANCE and params_after == predicted
        return VerifyResult(ok, rel, max_abs, params_before, params_after, predicted, flops_before,
                            forward_flops(gm), len(plan.keep), seconds)
    finally:
        gm.train(was_training)
