"""trial: a plan's shrink tried on the model itself against its mask, without a copy of the model.

The self-check of a reconfiguration asks whether the shrunk model computes what the masked one
does. Checking on copies costs two copies of the model. Here the dropped slices that are not
zero already are set aside (the lasso has usually zeroed them, so this is often nothing), the
model is masked in place and run, shrunk in place and run again. Two uses:

- `checked_shrink` keeps the shrink when the outputs agree (and then slices gradients and
  optimizer state), and undoes it when they do not: one slicing pass, two forwards;
- `shrunk_and_masked` always undoes it, for a check that must leave the model as it was (the
  one-group-at-a-time search for the groups that fail); `masked_output` only masks, for measuring what
  a plan would take from the model's function.

Undoing expands each tensor back with zeros in the dropped positions and writes the saved slices
in. Parameters keep their identity throughout; the extra memory is the saved slices (plus one
tensor in flight).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ptgraph.errors import UserError
from ptgraph.passes.flow import ChannelFlow
from ptgraph.passes.groups import ChannelAnalysis
from ptgraph.passes.plan import PrunePlan
from ptgraph.passes.shrink import (ShrinkReport, _emptied, _owner, _select, _slices, alive_after, count_params, finish,
                                   set_alive, set_data, slice_grad_and_state)

FAILURES = (RuntimeError, ValueError, IndexError, TypeError, AssertionError, UserError)
Flatten = Callable[[Any], torch.Tensor]


@dataclass
class _Cut:
    """One tensor's slicing and what undoes it: per cut axis, in the order applied, the kept and dropped
    positions, the shape before that step, and the dropped slab taken from the full tensor (full along every
    other axis; None when it is all zero). Buffers and plain attributes keep their original object instead."""

    owner: nn.Module
    attr: str
    steps: list[tuple[int, torch.Tensor, torch.Tensor, torch.Size, torch.Tensor | None]] = field(default_factory=list)
    original: torch.Tensor | None = None
    shrunk: bool = False

    @property
    def param(self) -> nn.Parameter | None:
        t = getattr(self.owner, self.attr)
        return t if isinstance(t, nn.Parameter) else None

    def get(self) -> torch.Tensor:
        t = getattr(self.owner, self.attr)
        return t.data if isinstance(t, nn.Parameter) else t

    def put(self, value: torch.Tensor) -> None:
        if self.param is not None:
            set_data(self.param, value)
        elif self.attr in self.owner._buffers:
            self.owner._buffers[self.attr] = value
        else:
            setattr(self.owner, self.attr, value)


def _save(module: nn.Module, name: str, cuts: list[tuple[int, np.ndarray]]) -> _Cut:
    owner, attr = _owner(module, name)
    c = _Cut(owner, attr)
    t = c.get()
    if c.param is None:
        c.original = t
    shape = list(t.shape)
    for axis, keep in sorted(cuts, key=lambda cut: -cut[0]):  # inner axes first: 1.5x faster on a 2-D weight
        kept = torch.as_tensor(keep, dtype=torch.long, device=t.device)
        dropped = torch.as_tensor(np.setdiff1d(np.arange(t.shape[axis]), keep), dtype=torch.long, device=t.device)
        slab = t.index_select(axis, dropped) if c.original is None else None
        c.steps.append((axis, kept, dropped, torch.Size(shape), slab if slab is not None and slab.any() else None))
        shape[axis] = len(keep)
    return c


def _zero(c: _Cut) -> None:
    """The dropped positions set to zero in place: the masked tensor."""
    t = c.get()
    if c.original is not None:
        c.put(t.clone())  # a buffer's original object stays untouched
        t = c.get()
    for axis, _, dropped, _, _ in c.steps:
        t.index_fill_(axis, dropped, 0)


def _shrink(c: _Cut) -> None:
    t = c.get()
    for axis, kept, _, _, _ in c.steps:
        t = _select(t, axis, kept)
    c.put(t)
    c.shrunk = True


def _expand_with_zeros(c: _Cut) -> None:
    """The shrunk tensor back at full size, the dropped positions zero: the masked tensor."""
    t = c.get()
    for axis, kept, dropped, shape, _ in reversed(c.steps):
        channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
        full = torch.empty(shape, dtype=t.dtype, device=t.device,
                           memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        t = full.index_copy_(axis, kept, t).index_fill_(axis, dropped, 0)
    c.put(t)
    c.shrunk = False


def _restore(c: _Cut) -> None:
    """The masked (full-size) tensor back to its original values."""
    if c.original is not None:
        c.put(c.original)
        return
    t = c.get()
    for axis, _, dropped, _, slab in c.steps:
        if slab is not None:
            t.index_copy_(axis, dropped, slab)


def _undo(cuts: list[_Cut]) -> None:
    with torch.no_grad():
        for c in reversed(cuts):
            if c.shrunk:
                _expand_with_zeros(c)
            _restore(c)


class _GraphState:
    """What a trial changes besides tensors: the alive elements, module attributes and the graph's calls. The calls
    are restored as they were written (a rewrite may write a literal where the graph computed a size, or turn a
    chunk into a split)."""

    def __init__(self, flow: ChannelFlow, gm: fx.GraphModule) -> None:
        self.flow, self.gm, self.alive = flow, gm, flow.alive
        self.calls = {n: (n.op, n.target, n.args, n.kwargs) for n in gm.graph.nodes} if flow.graph_rewrites else {}

    def changed(self) -> bool:
        return self.flow.alive is not self.alive

    def restore(self) -> None:
        self.flow.alive = self.alive
        for fix in self.flow.module_fixes:
            fix(self.flow.count)
        if self.calls:
            for n, (op, target, args, kwargs) in self.calls.items():
                n.op, n.target, n.args, n.kwargs = op, target, args, kwargs
            self.gm.recompile()


def eval_mode(module: nn.Module) -> Callable[[], None]:
    """Put `module` in eval mode; returns what puts every submodule back in the mode it had (which need not
    be its parent's)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()

    def restore() -> None:
        for m, training in modes:
            m.training = training
    return restore


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| / |want|; inf on a shape mismatch, 0 where `want` is not finite (nothing to compare)."""
    if got.shape != want.shape:
        return float("inf")
    if not torch.isfinite(want).all():
        return 0.0
    scale = float(want.norm())
    diff = (got - want).abs()
    return float((got - want).norm()) / scale if scale > 0 else (float(diff.max()) if len(diff) else 0.0)


def shrunk_and_masked(analysis: ChannelAnalysis, plan: PrunePlan, inputs: tuple, flatten: Flatten,
                      masked: bool = True) -> tuple[Any, Any] | None:
    """The outputs (flattened by `flatten`) of the model shrunk by `plan` and of the model masked by it (None
    without `masked`: only whether the shrunk model runs is asked), computed in place under no_grad in the
    model's current mode; None if the shrink or its forward fails. On return the model, its attributes, its
    graph and the analysis are exactly as they were."""
    flow, gm = analysis.flow, analysis.graph.module
    alive = alive_after(analysis, plan)
    if _emptied(flow, alive):
        return None
    graph = _GraphState(flow, gm)
    cuts: list[_Cut] = []
    try:
        with torch.no_grad():
            cuts = [_save(gm, name, axis_cuts) for name, axis_cuts in _slices(flow, alive).items()]
            for c in cuts:
                _shrink(c)
            set_alive(flow, gm, alive)
            got = flatten(gm(*inputs))
            for c in cuts:
                _expand_with_zeros(c)
            graph.restore()
            want = flatten(gm(*inputs)) if masked else None
        return got, want
    except FAILURES:
        return None  # a shrink that cannot even run is the clearest mismatch
    finally:
        _undo(cuts)
        if graph.changed():
            graph.restore()


def masked_output(analysis: ChannelAnalysis, plan: PrunePlan, inputs: tuple, flatten: Flatten) -> Any:
    """The output (flattened) of the model masked by `plan`, computed in place under no_grad in the model's
    current mode; the dropped values are set aside and written back, so the model ends exactly as it was."""
    gm = analysis.graph.module
    cuts: list[_Cut] = []
    try:
        with torch.no_grad():
            cuts = [_save(gm, n, a) for n, a in _slices(analysis.flow, alive_after(analysis, plan)).items()]
            for c in cuts:
                _zero(c)
            return flatten(gm(*inputs))
    finally:
        _undo(cuts)


def checked_shrink(analysis: ChannelAnalysis, plan: PrunePlan, inputs: tuple, flatten: Flatten, tolerance: float,
                   optimizer: torch.optim.Optimizer | None = None) -> tuple[ShrinkReport | None, float, float]:
    """shrink(analysis, plan, optimizer), kept only if it passes the self-check: on `inputs`, in eval mode,
    the exact groups shrunk must compute what they compute masked (relative error at most `tolerance`), and
    the whole plan's shrunk model must run (an inexact group, such as normalisation statistics, cannot match
    its mask). Returns (report, error, seconds the check itself took: saving, masking, forwards); on a failure
    the report is None and the model exactly as it was."""
    start = time.perf_counter()
    plan.check(analysis.groups)
    flow, gm = analysis.flow, analysis.graph.module
    exact = {g.id for g in analysis.groups if g.exact}
    stages = [PrunePlan({g: k for g, k in plan.keep.items() if g in exact}), plan]
    sizes_before, params_before = {g.id: g.size for g in analysis.groups}, count_params(gm)
    alive_exact, alive_all = alive_after(analysis, stages[0]), alive_after(analysis, plan)
    if _emptied(flow, alive_all):
        return None, float("inf"), 0.0
    graph = _GraphState(flow, gm)
    restore_modes = eval_mode(gm)
    cuts: list[_Cut] = []
    err, kept, check = float("inf"), False, 0.0
    try:
        with torch.no_grad():
            if stages[0].keep:  # masked, then shrunk, in place
                exact_cuts = [_save(gm, n, a) for n, a in _slices(flow, alive_exact).items()]
                cuts += exact_cuts
                for c in exact_cuts:
                    _zero(c)
                want = flatten(gm(*inputs))
                check = time.perf_counter() - start
                for c in exact_cuts:
                    _shrink(c)
                set_alive(flow, gm, alive_exact)
                t = time.perf_counter()
                err = relative_error(flatten(gm(*inputs)), want)
                check += time.perf_counter() - t
                if err > tolerance:
                    return None, err, check
            if len(stages[0].keep) < len(plan.keep):  # the rest only has to run
                rest = [_save(gm, n, a) for n, a in _slices(flow, alive_all).items()]
                cuts += rest
                for c in rest:
                    _shrink(c)
                set_alive(flow, gm, alive_all)
                t = time.perf_counter()
                flatten(gm(*inputs))
                check += time.perf_counter() - t
            err, kept = 0.0 if not stages[0].keep else err, True
    except FAILURES:
        return None, float("inf"), time.perf_counter() - start
    finally:
        restore_modes()
        if not kept:
            _undo(cuts)
            if graph.changed():
                graph.restore()
    state = optimizer.state if optimizer is not None else {}
    with torch.no_grad():
        for c in cuts:
            if c.param is not None:
                slice_grad_and_state(c.param, [(shape, axis, kept) for axis, kept, _, shape, _ in c.steps], state)
    return finish(analysis, sizes_before, params_before, start), err, check
