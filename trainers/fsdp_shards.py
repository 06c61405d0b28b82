"""Arithmetic over FSDP2 shards without gathering whole parameters: which rows of a parameter a rank holds,
a group's channel norms (each rank's partial sums, one all_reduce) and the lasso's proximal step on the local
rows. trainers/fsdp.py builds and re-shards the model; trainers/lasso.py calls these when its module is sharded."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ptgraph.trainers.lasso import ChannelIndex, square_sums

try:  # FSDP2's public API (torch >= 2.6)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = ()  # type: ignore[assignment,misc]


def is_sharded(t: torch.Tensor) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def local_rows(full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """This rank's rows of `full` as FSDP2 shards dim 0 (torch.chunk: ceil(n / world) rows each, the last ranks
    possibly fewer or none)."""
    chunks = torch.chunk(full, world, dim=0) if full.dim() else (full,)
    if rank < len(chunks):
        return chunks[rank]
    return full.new_empty((0, *full.shape[1:]))


def first_row(p: torch.Tensor, world: int, rank: int) -> int:
    """Index of this rank's first row of the sharded parameter `p`."""
    n = p.shape[0]
    return min(rank * math.ceil(n / world), n)


# -- norms and the proximal step over shards ---------------------------------------------------------------
def sharded_sq_norms(index: ChannelIndex, module: nn.Module) -> torch.Tensor:
    """`lasso.channel_sq_norms` of a sharded module: each rank reduces its own rows (a full-length vector of
    partial sums along every axis but the sharded one, its slice of rows along it), one all_reduce adds them.
    No parameter is gathered; the traffic is one float per channel position."""
    world, rank = dist.get_world_size(), dist.get_rank()
    params = dict(module.named_parameters())
    pieces = []
    for name, axes in zip(index.params, index.axes):
        p = params[name]
        local = p.to_local() if is_sharded(p) else p.detach()
        for axis in axes:
            n = p.shape[axis]
            if not is_sharded(p):  # replicated: every rank holds all of it, count it once
                piece = square_sums(local.detach(), axis) * (1.0 if rank == 0 else 0.0)
            elif local.shape[0] == 0:
                piece = torch.zeros(n, device=local.device)
            elif axis == 0:
                piece = torch.zeros(n, device=local.device)
                off = first_row(p, world, rank)
                piece[off:off + local.shape[0]] = square_sums(local.detach(), 0)
            else:
                piece = square_sums(local.detach(), axis)
            pieces.append(piece.float())
    if not pieces:
        return torch.zeros(0)
    flat = torch.cat(pieces)
    dist.all_reduce(flat)
    sums = torch.zeros(index.n_slots + 1, device=flat.device, dtype=flat.dtype).index_add(0, index.slots.to(flat.device), flat)
    return sums[:index.n_slots]


@torch.no_grad()
def sharded_proximal_step(index: ChannelIndex, module: nn.Module, strength: float,
                          weights: torch.Tensor | None = None) -> None:
    """`lasso.proximal_step` on the local shards: the same factors on every rank (from the all-reduced norms),
    each rank scaling its own rows."""
    world, rank = dist.get_world_size(), dist.get_rank()
    norms = sharded_sq_norms(index, module).sqrt()
    shrink_by = strength if weights is None else strength * weights.to(norms.device)
    scale = torch.cat([(1 - shrink_by / norms.clamp_min(1e-30)).clamp_min(0), norms.new_ones(1)])
    factors = iter(scale[index.slots.to(norms.device)].split(index.lengths))
    params = dict(module.named_parameters())
    for name, axes in zip(index.params, index.axes):
        p = params[name]
        local = p.to_local() if is_sharded(p) else p
        total = None
        for axis in axes:
            f = next(factors)
            if axis == 0 and is_sharded(p):
                off = first_row(p, world, rank)
                f = f[off:off + local.shape[0]]
            shape = [1] * local.dim()
            shape[axis] = -1
            f = f.view(shape)
            total = f if total is None else total * f
        if local.numel():
            local.mul_(total.to(local.dtype))
