"""shrink: remove the channels a plan drops, in place, from the model, its optimizer and the analysis.

Every parameter keeps its identity (only `.data` changes), so optimizers, hooks and the user's
own references stay valid; gradients and per-parameter optimizer state (momentum, Adam
moments) are sliced the same way. Runs on whatever device the model lives on.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ptgraph.errors import UserError
from ptgraph.passes.flow import ChannelFlow, _all_types
from ptgraph.passes.groups import ChannelAnalysis
from ptgraph.passes.plan import PrunePlan


@dataclass(frozen=True)
class ShrinkReport:
    groups: dict[int, tuple[int, int]]  # group id -> (channels before, after), for groups that shrank
    params_before: int
    params_after: int
    seconds: float


def _alive_after(analysis: ChannelAnalysis, plan: PrunePlan) -> np.ndarray:
    flow = analysis.flow
    dropped = [np.delete(analysis.channel_roots[g], list(keep)) for g, keep in plan.keep.items()]
    if not dropped:
        return flow.alive.copy()
    roots = flow.space.roots()
    return flow.alive & ~np.isin(roots, np.concatenate(dropped))


def _emptied(flow: ChannelFlow, alive: np.ndarray) -> tuple[str, np.ndarray] | None:
    """A tracked tensor axis of the graph that would keep no channel, with its elements; or None.

    plan.check sees parameters only; a parameter-free piece of a split can lose all its
    channels too, and most ops (pooling, a view with -1) reject a size-0 channel axis.
    """
    for node, t in flow.types.items():
        for tt in _all_types(t):
            for axis, ids in tt.items():
                if len(ids) and flow.alive[ids].any() and not alive[ids].any():
                    return f"axis {axis} of the tensor '{node.name}'", ids
    for name, axes in flow.param_axes.items():
        for axis, ids in axes.items():
            if len(ids) and flow.alive[ids].any() and not alive[ids].any():
                return f"axis {axis} of '{name}'", ids
    return None


def keep_every_tensor(analysis: ChannelAnalysis, plan: PrunePlan,
                      scores: dict[int, np.ndarray] | None = None) -> PrunePlan:
    """The plan, plus for every tensor it would empty the best of that tensor's channels (highest
    score, else the first), so that no tensor ends with a size-0 channel axis."""
    keep = {g: set(k) for g, k in plan.keep.items()}
    where = {int(r): (g, c) for g in keep for c, r in enumerate(analysis.channel_roots[g])}
    roots = analysis.flow.space.roots()
    while True:
        current = PrunePlan({g: tuple(sorted(k)) for g, k in keep.items()})
        hit = _emptied(analysis.flow, _alive_after(analysis, current))
        if hit is None:
            return current
        candidates = [where[int(r)] for r in np.unique(roots[hit[1][analysis.flow.alive[hit[1]]]]) if int(r) in where]
        assert candidates, "an emptied tensor must hold a dropped channel"
        g, c = max(candidates, key=lambda gc: scores[gc[0]][gc[1]] if scores else -gc[1])
        keep[g].add(c)


def _slices(flow: ChannelFlow, alive: np.ndarray) -> dict[str, list[tuple[int, np.ndarray]]]:
    """name -> [(axis, kept positions)] for every tensor that loses something."""
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, axes in flow.param_axes.items():
        for axis, ids in axes.items():
            before, after = flow.alive[ids], alive[ids]
            if (before & ~after).any():
                out.setdefault(name, []).append((axis, np.nonzero(after[before])[0]))
    return out


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def predict_params(analysis: ChannelAnalysis, plan: PrunePlan) -> int:
    """The parameter count the model will have after shrink(plan), computed from the groups alone."""
    gm = analysis.graph.module
    params = dict(gm.named_parameters())
    total = count_params(gm)
    for name, cuts in _slices(analysis.flow, _alive_after(analysis, plan)).items():
        if name not in params:
            continue
        shape = list(params[name].shape)
        old = int(np.prod(shape))
        for axis, keep in cuts:
            shape[axis] = len(keep)
        total -= old - int(np.prod(shape))
    return total


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _select(t: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """index_select that keeps a channels_last tensor channels_last (index_select returns NCHW)."""
    out = t.index_select(axis, index)
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _slice_tensor(module: nn.Module, name: str, axis: int, keep: np.ndarray, state: dict) -> None:
    owner, attr = _owner(module, name)
    t = getattr(owner, attr)
    index = torch.as_tensor(keep, dtype=torch.long, device=t.device)
    old_shape = t.shape
    with torch.no_grad():
        if isinstance(t, nn.Parameter):
            grad = t.grad
            new = _select(t.data, axis, index)
            # A live autograd graph (last step's loss) keeps the parameter's AccumulateGrad node,
            # which remembers the old shape; setting data of another dtype first drops it.
            t.data = torch.empty(0, dtype=torch.float64 if t.dtype != torch.float64 else torch.float32,
                                 device=t.device)
            t.data = new
            if grad is not None:
                t.grad = _select(grad, axis, index)
            for key, value in state.get(t, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == old_shape:
                    state[t][key] = _select(value, axis, index)
        elif attr in owner._buffers:
            owner._buffers[attr] = t.index_select(axis, index)
        else:
            setattr(owner, attr, t.index_select(axis, index))


def shrink(analysis: ChannelAnalysis, plan: PrunePlan, optimizer: torch.optim.Optimizer | None = None) -> ShrinkReport:
    """Apply `plan` in place: slice every member, fix module attributes and graph constants, refresh groups."""
    start = time.perf_counter()
    plan.check(analysis.groups)
    flow, gm = analysis.flow, analysis.graph.module
    params_before = count_params(gm)
    sizes_before = {g.id: g.size for g in analysis.groups}
    alive = _alive_after(analysis, plan)
    emptied = _emptied(flow, alive)
    if emptied:
        raise UserError(f"the plan removes every channel of {emptied[0]} (a tensor cannot have size 0); "
                        f"keep at least one of its channels, e.g. with keep_every_tensor(analysis, plan)")
    state = optimizer.state if optimizer is not None else {}
    for name, cuts in _slices(flow, alive).items():
        for axis, keep in cuts:
            _slice_tensor(gm, name, axis, keep, state)
    flow.alive = alive
    for fix in flow.module_fixes:
        fix(flow.count)
    if flow.graph_rewrites:
        for fix in flow.graph_rewrites:
            fix(flow.count)
        gm.recompile()
    for node in gm.graph.nodes:
        if node in flow.types:
            node.meta["shape"] = flow.current_shape(node)
        elif node.op == "get_attr" and isinstance(node.meta.get("shape"), tuple):  # weights read by F.linear & co.
            owner, attr = _owner(gm, node.target)
            value = getattr(owner, attr, None)
            if isinstance(value, torch.Tensor):
                node.meta["shape"] = tuple(value.shape)
    analysis.refresh()
    changed = {g.id: (sizes_before[g.id], g.size) for g in analysis.groups if g.size != sizes_before[g.id]}
    return ShrinkReport(changed, params_before, count_params(gm), time.perf_counter() - start)


def mask(module: nn.Module, analysis: ChannelAnalysis, plan: PrunePlan) -> nn.Module:
    """Zero the dropped channels of every member in `module` (the graph module or a copy of it).

    This is the reference meaning of a plan: for exact groups, shrink(plan) computes what the
    masked model computes.
    """
    plan.check(analysis.groups)
    by_id = {g.id: g for g in analysis.groups}
    with torch.no_grad():
        for gid, keep in plan.keep.items():
            g = by_id[gid]
            dropped = np.ones(g.size, dtype=bool)
            dropped[list(keep)] = False
            for m in g.members:
                pos = m.positions[dropped[m.channels]]
                if len(pos):
                    owner, attr = _owner(module, m.name)
                    t = getattr(owner, attr)
                    t.index_fill_(m.axis, torch.as_tensor(pos, dtype=torch.long, device=t.device), 0)
    return module
