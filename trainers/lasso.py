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
    """For every penalised parameter axis, the channel slot of each position along it. Positions that
    belong to no prunable group point at the spare slot `n_slots`: not counted in any norm, scaled by 1."""

    params: tuple[str, ...]  # parameter names, in the order their slot maps are concatenated
    axes: tuple[tuple[int, ...], ...]  # per parameter: the axes that are reduced separately
    slots: torch.Tensor  # the slot maps of every (parameter, axis), concatenated
    lengths: tuple[int, ...]  # the length of each of those maps
    group_slices: dict[int, slice]  # group id -> its slots
    n_slots: int


def build_index(groups: tuple[ChannelGroup, ...], module: nn.Module, device: torch.device) -> ChannelIndex:
    params = dict(module.named_parameters())
    maps: dict[str, dict[int, np.ndarray]] = {}
    group_slices, offset = {}, 0
    for g in groups:
        if not g.prunable:
            continue
        group_slices[g.id] = slice(offset, offset + g.size)
        for m in g.members:
            if m.name in params:  # buffers (running stats) carry no weight to penalise
                full = maps.setdefault(m.name, {}).setdefault(m.axis, np.full(params[m.name].shape[m.axis], -1))
                fresh = full[m.positions] < 0  # a position shared by two members counts once
                full[m.positions[fresh]] = m.channels[fresh] + offset
        offset += g.size
    names, axes, slot_maps = [], [], []
    for name, by_axis in maps.items():
        names.append(name)
        axes.append(tuple(by_axis))
        slot_maps += [np.where(full < 0, offset, full) for full in by_axis.values()]
    flat = np.concatenate(slot_maps) if slot_maps else np.zeros(0, dtype=np.int64)
    return ChannelIndex(tuple(names), tuple(axes), torch.as_tensor(flat, device=device),
                        tuple(len(s) for s in slot_maps), group_slices, offset)


def square_sums(p: torch.Tensor, axis: int, chunk_bytes: int = 1 << 21) -> torch.Tensor:
    """Sum of squares over every axis of `p` but `axis`, in float32 (differentiable). Never materialises the
    square of a whole weight: along the leading axis a norm reduction reads it once; along another axis the
    rows are reduced in cache-sized chunks (a strided reduction over a large weight is 20x slower)."""
    other = [d for d in range(p.dim()) if d != axis]
    if not other:
        return p.float().square()
    if axis == 0 or p.shape[0] == 1:
        half = p.dtype in (torch.float16, torch.bfloat16)
        return torch.linalg.vector_norm(p, dim=other, dtype=torch.float32 if half else None).float().square()
    rows = max(1, chunk_bytes // max(1, p[0].numel() * 4))
    return sum(c.float().square().sum(dim=other) for c in p.split(rows))


def channel_sq_norms(index: ChannelIndex, module: nn.Module) -> torch.Tensor:
    """Squared L2 norm of every prunable channel over all its member slices (differentiable)."""
    params = dict(module.named_parameters())
    if any(hasattr(p, "device_mesh") for p in params.values()):  # FSDP2's DTensors: reduced over the shards
        from ptgraph.trainers.fsdp_shards import sharded_sq_norms

        return sharded_sq_norms(index, module)
    pieces = []
    for name, axes in zip(index.params, index.axes):
        for axis in axes:
            pieces.append(square_sums(params[name], axis))
    if not pieces:
        return torch.zeros(0)
    flat = torch.cat(pieces)
    sums = torch.zeros(index.n_slots + 1, device=flat.device, dtype=flat.dtype).index_add(0, index.slots, flat)
    return sums[:index.n_slots]


def group_lasso(index: ChannelIndex, module: nn.Module) -> torch.Tensor:
    """Sum over every prunable channel of its L2 norm. The tiny epsilon keeps the gradient finite at 0."""
    return channel_sq_norms(index, module).add(1e-12).sqrt().sum()


@torch.no_grad()
def proximal_step(index: ChannelIndex, module: nn.Module, strength: float, weights: torch.Tensor | None = None) -> None:
    """Group soft-thresholding: scale each channel by max(0, 1 - strength * weight / norm), giving exact zeros.

    `strength` is lr * lambda; `weights` (one per channel slot, default 1) make the penalty adaptive. A weight shared by two groups (a conv's in and out channels) is
    scaled by both factors, the usual approximation for overlapping groups. One gather makes every
    factor; each parameter then takes one multiply (a few kernels per layer: this runs every step).
    """
    if any(hasattr(p, "device_mesh") for p in module.parameters()):  # FSDP2: each rank scales its own rows
        from ptgraph.trainers.fsdp_shards import sharded_proximal_step

        return sharded_proximal_step(index, module, strength, weights)
    norms = channel_sq_norms(index, module).sqrt()
    shrink = strength if weights is None else strength * weights
    scale = torch.cat([(1 - shrink / norms.clamp_min(1e-30)).clamp_min(0), norms.new_ones(1)])
    factors = iter(scale[index.slots].split(index.lengths))
    params = dict(module.named_parameters())
    for name, axes in zip(index.params, index.axes):
        p = params[name]
        total = None
        for axis in axes:
            shape = [1] * p.dim()
            shape[axis] = -1
            f = next(factors).view(shape)
            total = f if total is None else total * f
        p.mul_(total.to(p.dtype))

