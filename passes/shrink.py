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


def element_roots(flow: ChannelFlow) -> np.ndarray:
    """Every element's union-find root; cached (the unions are all made by the analysis, before any plan)."""
    n = len(flow.space)
    if flow.roots is None or len(flow.roots) != n:
        flow.roots = flow.space.roots()
    return flow.roots


def alive_after(analysis: ChannelAnalysis, plan: PrunePlan) -> np.ndarray:
    """The flow's alive elements after `plan`: an element dies with its channel's root."""
    flow = analysis.flow
    dropped = [np.delete(analysis.channel_roots[g], list(keep)) for g, keep in plan.keep.items()]
    if not dropped:
        return flow.alive.copy()
    roots = element_roots(flow)
    dead = np.zeros(len(roots), dtype=bool)
    dead[np.concatenate(dropped)] = True
    return flow.alive & ~dead[roots]


@dataclass(frozen=True)
class AxisIndex:
    """Every tracked axis of the graph (tensor axes, then parameter axes) as one concatenation of element ids,
    so that 'which axis would keep no channel' is two vectorised reductions, not a loop over the graph."""

    labels: tuple[str, ...]
    ids: tuple[np.ndarray, ...]
    flat: np.ndarray
    starts: np.ndarray


def axis_index(flow: ChannelFlow) -> AxisIndex:
    """Built once per analysis (the axes never change; a shrink only marks elements dead)."""
    if flow.axis_index is None:
        labels, ids = [], []
        for node, t in flow.types.items():
            for tt in _all_types(t):
                for axis, a in tt.items():
                    if len(a):
                        labels.append(f"axis {axis} of the tensor '{node.name}'")
                        ids.append(a)
        for name, axes in flow.param_axes.items():
            for axis, a in axes.items():
                if len(a):
                    labels.append(f"axis {axis} of '{name}'")
                    ids.append(a)
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        starts = np.cumsum([0] + [len(a) for a in ids[:-1]]) if ids else np.zeros(0, dtype=np.int64)
        flow.axis_index = AxisIndex(tuple(labels), tuple(ids), flat, starts)
    return flow.axis_index


def _emptied(flow: ChannelFlow, alive: np.ndarray) -> tuple[str, np.ndarray] | None:
    """A tracked tensor axis of the graph that would keep no channel, with its elements; or None.

    plan.check sees parameters only; a parameter-free piece of a split can lose all its
    channels too, and most ops (pooling, a view with -1) reject a size-0 channel axis.
    """
    index = axis_index(flow)
    if not index.labels:
        return None
    hit = np.logical_or.reduceat(flow.alive[index.flat], index.starts) & \
        ~np.logical_or.reduceat(alive[index.flat], index.starts)
    first = np.flatnonzero(hit)
    return (index.labels[first[0]], index.ids[first[0]]) if len(first) else None


def keep_every_tensor(analysis: ChannelAnalysis, plan: PrunePlan,
                      scores: dict[int, np.ndarray] | None = None) -> PrunePlan:
    """The plan, plus for every tensor it would empty the best of that tensor's channels (highest
    score, else the first), so that no tensor ends with a size-0 channel axis."""
    hit = _emptied(analysis.flow, alive_after(analysis, plan))
    if hit is None:
        return plan
    keep = {g: set(k) for g, k in plan.keep.items()}
    where = {int(r): (g, c) for g in keep for c, r in enumerate(analysis.channel_roots[g])}
    roots = element_roots(analysis.flow)
    while True:
        if hit is None:
            return PrunePlan({g: tuple(sorted(k)) for g, k in keep.items()})
        candidates = [where[int(r)] for r in np.unique(roots[hit[1][analysis.flow.alive[hit[1]]]]) if int(r) in where]
        assert candidates, "an emptied tensor must hold a dropped channel"
        g, c = max(candidates, key=lambda gc: scores[gc[0]][gc[1]] if scores else -gc[1])
        keep[g].add(c)
        hit = _emptied(analysis.flow, alive_after(analysis, PrunePlan({g: tuple(sorted(k)) for g, k in keep.items()})))


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
    for name, cuts in _slices(analysis.flow, alive_after(analysis, plan)).items():
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


def set_data(p: nn.Parameter, new: torch.Tensor) -> None:
    """p.data = new, also across a shape change: a live autograd graph (last step's loss) keeps the
    parameter's AccumulateGrad node, which remembers the old shape; setting data of another dtype first
    drops it."""
    if new.shape != p.shape:
        p.data = torch.empty(0, dtype=torch.float64 if p.dtype != torch.float64 else torch.float32, device=p.device)
    p.data = new


def slice_grad_and_state(p: nn.Parameter, steps: list[tuple[torch.Size, int, torch.Tensor]], state: dict) -> None:
    """The gradient and the optimizer state of `p` follow the slicings of its data, (shape before, axis, kept
    positions) in order; the gradient is set once, at the data's shape."""
    def sliced(value: torch.Tensor) -> torch.Tensor:
        for shape, axis, index in steps:
            if value.shape == shape:
                value = _select(value, axis, index)
        return value

    if p.grad is not None:
        p.grad = sliced(p.grad)
    for key, value in state.get(p, {}).items():
        if isinstance(value, torch.Tensor):
            state[p][key] = sliced(value)


def _slice_tensor(module: nn.Module, name: str, axis: int, keep: np.ndarray, state: dict) -> None:
    owner, attr = _owner(module, name)
    t = getattr(owner, attr)
    index = torch.as_tensor(keep, dtype=torch.long, device=t.device)
    old_shape = t.shape
    with torch.no_grad():
        if isinstance(t, nn.Parameter):
            set_data(t, _select(t.data, axis, index))
            slice_grad_and_state(t, [(old_shape, axis, index)], state)
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
    alive = alive_after(analysis, plan)
    emptied = _emptied(flow, alive)
    if emptied:
        raise UserError(f"the plan removes every channel of {emptied[0]} (a tensor cannot have size 0); "
                        f"keep at least one of its channels, e.g. with keep_every_tensor(analysis, plan)")
    state = optimizer.state if optimizer is not None else {}
    for name, cuts in _slices(flow, alive).items():
        for axis, keep in sorted(cuts, key=lambda cut: -cut[0]):  # inner axes first: 1.5x faster on a 2-D weight
            _slice_tensor(gm, name, axis, keep, state)
    set_alive(flow, gm, alive)
    return finish(analysis, sizes_before, params_before, start)


def set_alive(flow: ChannelFlow, gm: nn.Module, alive: np.ndarray) -> None:
    """The flow's alive elements, and the module attributes and graph constants that follow from them."""
    flow.alive = alive
    for fix in flow.module_fixes:
        fix(flow.count)
    if flow.graph_rewrites:
        for fix in flow.graph_rewrites:
            fix(flow.count)
        gm.recompile()


def finish(analysis: ChannelAnalysis, sizes_before: dict[int, int], params_before: int, start: float) -> ShrinkReport:
    """After the tensors are sliced and `set_alive`: the recorded node shapes and the groups follow."""
    flow, gm = analysis.flow, analysis.graph.module
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
