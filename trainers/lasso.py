"""Group lasso over channel groups, in a handful of vectorised ops for the whole model.

Every prunable channel of every group gets one slot in a flat vector. Each bound parameter
axis is squared and summed over its other axes once; one index_add scatters all those
per-position sums into the channel slots; a sqrt gives every channel's L2 norm over all of
its member slices (weights, biases, norm affine parameters).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ptgraph.passes import ChannelGroup


@dataclass(frozen=True, eq=False)
class ChannelIndex:
    """Where each member position's squared sum goes in the flat channel vector."""

    params: tuple[str, ...]  # parameter names, in the order their reductions are concatenated
    axes: tuple[tuple[int, ...], ...]  # per parameter: the axes that are reduced separately
    positions: tuple[tuple[torch.Tensor, ...], ...]  # per parameter, per axis: positions that are channels
    slots: torch.Tensor  # channel slot of each concatenated position
    group_slices: dict[int, slice]  # group id -> its slots
    n_slots: int


def build_index(groups: tuple[ChannelGroup, ...], module: nn.Module, device: torch.device) -> ChannelIndex:
    params = dict(module.named_parameters())
    per_param: dict[str, dict[int, list[tuple[np.ndarray, np.ndarray]]]] = {}
    group_slices, offset = {}, 0
    for g in groups:
        if not g.prunable:
            continue
        group_slices[g.id] = slice(offset, offset + g.size)
        for m in g.members:
            if m.name in params:  # buffers (running stats) carry no weight to penalise
                per_param.setdefault(m.name, {}).setdefault(m.axis, []).append((m.positions, m.channels + offset))
        offset += g.size
    names, axes, positions, slots = [], [], [], []
    for name, by_axis in per_param.items():
        names.append(name)
        axes.append(tuple(by_axis))
        pos_list = []
        for axis, parts in by_axis.items():
            pos = np.concatenate([p for p, _ in parts])
            pos_list.append(torch.as_tensor(pos, device=device))
            slots.append(np.concatenate([s for _, s in parts]))
        positions.append(tuple(pos_list))
    slot_tensor = torch.as_tensor(np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64), device=device)
    return ChannelIndex(tuple(names), tuple(axes), tuple(positions), slot_tensor, group_slices, offset)


def channel_sq_norms(index: ChannelIndex, module: nn.Module) -> torch.Tensor:
    """Squared L2 norm of every prunable channel over all its member slices (differentiable)."""
    params = dict(module.named_parameters())
    pieces = []
    for name, axes, positions in zip(index.params, index.axes, index.positions):
        sq = params[name].float().square()
        for axis, pos in zip(axes, positions):
            other = [d for d in range(sq.dim()) if d != axis]
            per_pos = sq.sum(dim=other) if other else sq
            pieces.append(per_pos.index_select(0, pos))
    if not pieces:
        return torch.zeros(0)
    flat = torch.cat(pieces)
    return torch.zeros(index.n_slots, device=flat.device, dtype=flat.dtype).index_add(0, index.slots, flat)


def group_lasso(index: ChannelIndex, module: nn.Module) -> torch.Tensor:
    """Sum over every prunable channel of its L2 norm. The tiny epsilon keeps the gradient finite at 0."""
    return channel_sq_norms(index, module).add(1e-12).sqrt().sum()


@torch.no_grad()
def proximal_step(index: ChannelIndex, module: nn.Module, strength: float) -> None:
    """Group soft-thresholding: scale each channel by max(0, 1 - strength / norm), giving exact zeros.

    `strength` is lr * lambda. A weight shared by two groups (a conv's in and out channels) is
    scaled by both factors, the usual approximation for overlapping groups.
    """
    norms = channel_sq_norms(index, module).sqrt()
    scale = (1 - strength / norms.clamp_min(1e-30)).clamp_min(0)
    params = dict(module.named_parameters())
    slot_iter = 0
    for name, axes, positions in zip(index.params, index.axes, index.positions):
        p = params[name]
        for axis, pos in zip(axes, positions):
            slots = index.slots[slot_iter:slot_iter + len(pos)]
            slot_iter += len(pos)
            factor = torch.ones(p.shape[axis], device=p.device, dtype=scale.dtype)
            factor[pos] = scale[slots]
            shape = [1] * p.dim()
            shape[axis] = -1
            p.mul_(factor.view(shape).to(p.dtype))
