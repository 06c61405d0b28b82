"""Channel groups: the classes of coupled channels, with every parameter slice that belongs to them.

A group is a set of spaces (births of channels) joined by unification: a residual stream is
one group, a DenseNet layer's output another however often it is concatenated. A channel is
one class of unified elements; pruning it removes every member slice listed for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import nn

from ptgraph.channels import ChannelSpace
from ptgraph.graph import Graph
from ptgraph.passes.flow import ChannelFlow, run_flow
from ptgraph.passes.rules import aten, lookup


@dataclass(frozen=True, eq=False)
class Member:
    """Positions `positions` along `axis` of parameter/buffer `name` hold channels `channels` of the group."""

    name: str
    axis: int
    positions: np.ndarray
    channels: np.ndarray


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    id: int
    size: int  # channels
    members: tuple[Member, ...]
    prunable: bool
    exact: bool  # removing zeroed channels provably leaves every output unchanged
    reason: str | None  # why frozen, or why inexact


class ChannelAnalysis:
    """The analysis of one traced model: its groups, kept current across shrinks without re-tracing."""

    def __init__(self, graph: Graph, flow: ChannelFlow) -> None:
        self.graph = graph
        self.flow = flow
        self._space_group = _group_spaces(flow.space)
        self._element_group = _split_outputs(flow.space, self._space_group)
        self.groups: tuple[ChannelGroup, ...] = ()
        self.channel_roots: dict[int, np.ndarray] = {}  # group id -> union-find root of each channel
        self.refresh()

    def refresh(self) -> None:
        """Recompute the groups from the flow's alive elements (after a shrink)."""
        self.groups, self.channel_roots = _build_groups(self.flow, self._element_group)

    def group(self, gid: int) -> ChannelGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(gid)

    @property
    def prunable_channel_fraction(self) -> float:
        total = sum(g.size for g in self.groups)
        return sum(g.size for g in self.groups if g.prunable) / total if total else 0.0

    @property
    def removable_channel_fraction(self) -> float:
        """Share of prunable channels among the channels a plan could remove: groups frozen only because
        they are the model's output (a classifier's classes, a language model's vocabulary) are fixed by the
        task and left out; index buffers (position ids) hold no channels at all."""
        total = sum(g.size for g in self.groups if g.prunable or g.reason != OUTPUT)
        return sum(g.size for g in self.groups if g.prunable) / total if total else 0.0

    def prunable_param_fraction(self) -> float:
        """Share of the parameters that prunable groups could remove (`prunable_params` over all)."""
        total = sum(p.numel() for p in self.graph.module.parameters())
        return self.prunable_params() / total if total else 0.0

    def conv_prunable_fraction(self) -> float:
        """Share of conv output channels that sit in prunable groups (the zoo's CNN target).

        Channels frozen only because they are the model's output (a classifier conv's classes)
        are fixed by the task, not by the analysis, and are left out of the count.
        """
        prunable = [g.id for g in self.groups if g.prunable]
        task = [g.id for g in self.groups if not g.prunable and g.reason == OUTPUT]
        total = hit = 0
        for name, axis in _conv_weights(self.graph.module).items():
            ids = self.flow.param_axes.get(name, {}).get(axis)
            if ids is None:
                continue
            groups = self._group_of_elements(ids[self.flow.alive[ids]])
            groups = groups[~np.isin(groups, task)]
            total += len(groups)
            hit += int(np.isin(groups, prunable).sum())
        return hit / total if total else 0.0

    def prunable_params(self) -> int:
        """Parameters that some prunable group could remove (a weight shared by two groups counts once)."""
        params = dict(self.graph.module.named_parameters())
        keep_share: dict[str, float] = {}
        for g in self.groups:
            if not g.prunable:
                continue
            for m in g.members:
                p = params.get(m.name)
                if p is not None:
                    keep_share[m.name] = keep_share.get(m.name, 1.0) * (1 - len(m.positions) / p.shape[m.axis])
        return int(round(sum(params[n].numel() * (1 - k) for n, k in keep_share.items())))

    def _group_of_elements(self, ids: np.ndarray) -> np.ndarray:
        return self._element_group[ids]

    @property
    def original_module_runs_pruned(self) -> bool:
        """False when a shrink rewrites constants of the graph (reshape sizes, split sections) that the
        original module's Python code may still hold, or when the graph was captured by torch.export (the
        user's code may compute sizes from its own attributes), or when fx traced a module through a
        decomposition (it keeps its old sizes): then run and export `graph.module`."""
        return not self.flow.graph_rewrites and self.graph.capture == "fx" and not self.graph.opened


def analyze_channels(graph: Graph) -> ChannelAnalysis:
    return ChannelAnalysis(graph, run_flow(graph, lookup))


_CONV_OPS = {F.conv1d: 0, F.conv2d: 0, F.conv3d: 0, F.conv_transpose1d: 1, F.conv_transpose2d: 1,
             F.conv_transpose3d: 1}
for _name, _axis in (("conv1d", 0), ("conv2d", 0), ("conv3d", 0), ("conv_transpose1d", 1), ("conv_transpose2d", 1),
                     ("conv_transpose3d", 1)):
    for _op in aten(f"{_name}.default", f"{_name}.input"):
        _CONV_OPS[_op] = _axis


def _conv_weights(gm: nn.Module) -> dict[str, int]:
    """Conv weight name -> its output-channel axis: conv modules, and conv calls on a weight the graph reads
    (a functional conv; every conv of a graph captured by torch.export, which has no conv modules)."""
    out = {f"{name}.weight": int(isinstance(m, nn.modules.conv._ConvTransposeNd))
           for name, m in gm.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for node in getattr(getattr(gm, "graph", None), "nodes", ()):
        axis = _CONV_OPS.get(node.target) if node.op == "call_function" else None
        weight = node.args[1] if axis is not None and len(node.args) > 1 else None
        if weight is not None and getattr(weight, "op", None) == "get_attr":
            out.setdefault(str(weight.target), axis)
    return out


def _group_spaces(space: ChannelSpace) -> np.ndarray:
    """space id -> group id: spaces sharing a channel are one group; ids follow birth order."""
    roots = space.roots()
    spaces = space.space_of(np.arange(len(roots)))
    linked = spaces != spaces[roots]  # an element's space meets its channel's root's space
    uf = ChannelSpace()
    uf.new(space.n_spaces)
    if linked.any():
        uf.unify(spaces[linked], spaces[roots[linked]])
    rep = uf.roots()
    _, dense = np.unique(rep, return_inverse=True)
    # renumber by first birth so group ids read in model order
    first = np.full(dense.max() + 1 if len(dense) else 0, len(dense))
    np.minimum.at(first, dense, np.arange(len(dense)))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[dense]


OUTPUT = "model output"


def _split_outputs(space: ChannelSpace, space_group: np.ndarray) -> np.ndarray:
    """element -> group id. A group only partly frozen as a model output (10 of a block's 20 channels added
    into the output, 10 feeding the next block alone), and frozen for nothing else, is split: the channels
    that reach the output become a group of their own, frozen, and the rest stay prunable. The analysis is
    element-level, so removing a channel that never reaches the output leaves the output unchanged. Split
    groups get ids after all others, once, at analysis time (ids stay stable across shrinks)."""
    n = len(space)
    group_of = space_group[space.space_of(np.arange(n))]
    if OUTPUT not in space.reasons or not n:
        return group_of
    why = space.frozen_index(np.arange(n))
    at_output = np.isin(why, [i for i, r in enumerate(space.reasons) if r == OUTPUT])
    n_groups = int(group_of.max()) + 1
    whole = np.zeros(n_groups, dtype=bool)  # frozen for another reason: stays one frozen group
    whole[group_of[(why >= 0) & ~at_output]] = True
    roots = space.roots()
    out_channel = np.zeros(n, dtype=bool)
    out_channel[roots[at_output]] = True
    reached = out_channel[roots]  # elements of a channel that reaches the output
    free = np.zeros(n_groups, dtype=bool)
    free[group_of[~reached]] = True
    split = free & ~whole
    touched = np.zeros(n_groups, dtype=bool)
    touched[group_of[reached]] = True
    split &= touched
    if not split.any():
        return group_of
    new_id = np.full(n_groups, -1, dtype=np.int64)
    new_id[split] = n_groups + np.arange(int(split.sum()))
    moved = reached & split[group_of]
    out = group_of.copy()
    out[moved] = new_id[group_of[moved]]
    return out


def _build_groups(flow: ChannelFlow, element_group: np.ndarray) -> tuple[tuple[ChannelGroup, ...], dict]:
    space = flow.space
    roots = space.roots()
    elems = np.nonzero(flow.alive)[0]
    if not len(elems):
        return (), {}
    group_of = element_group
    # channels: one per root among alive elements, ordered within a group by first element
    if len(elems) == len(roots):  # all alive: a root is its channel's smallest element (unify links to the lower)
        uniq_roots = first_elem = np.flatnonzero(roots == elems)
        order = np.argsort(group_of[first_elem], kind="stable")
    else:
        uniq_roots, first = np.unique(roots[elems], return_index=True)
        first_elem = elems[first]
        order = np.lexsort((first_elem, group_of[first_elem]))
    sorted_groups = group_of[first_elem][order]
    run = np.ones(len(order), dtype=bool)
    run[1:] = sorted_groups[1:] != sorted_groups[:-1]
    bounds = np.append(np.flatnonzero(run), len(order))
    channel_index = np.empty(len(roots), dtype=np.int64)
    channel_index[uniq_roots[order]] = np.arange(len(order)) - bounds[np.cumsum(run) - 1]
    gids, sizes = sorted_groups[bounds[:-1]].tolist(), np.diff(bounds).tolist()

    members = _members(flow, group_of, channel_index[roots])
    sorted_roots = uniq_roots[order]
    channel_roots = {g: sorted_roots[bounds[i]:bounds[i + 1]] for i, g in enumerate(gids)}
    elem_group = group_of[elems]
    frozen, inexact = space.reasons_by(elems, elem_group), space.reasons_by(elems, elem_group, inexact=True)
    out = []
    for g, size in zip(gids, sizes):
        why = frozen.get(g) or inexact.get(g)
        out.append(ChannelGroup(g, size, tuple(members.get(g, ())), g not in frozen, g not in inexact, why))
    return tuple(out), channel_roots


def _members(flow: ChannelFlow, group_of: np.ndarray, channel_of: np.ndarray) -> dict[int, list[Member]]:
    """Every parameter axis split by group, as runs of one group over all axes at once (a mask per axis
    and group cost 40 ms on DenseNet, whose BatchNorm axes span dozens of groups each). Per group,
    members follow param_axes' order; positions ascend within a member."""
    keys = [(name, axis) for name, axes in flow.param_axes.items() for axis in axes]
    every = [ids for axes in flow.param_axes.values() for ids in axes.values()]
    arrays = every if flow.alive.all() else [ids[flow.alive[ids]] for ids in every]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    if not lengths.sum():
        return {}
    ids = np.concatenate(arrays)
    groups, channels = group_of[ids], channel_of[ids]
    begins = np.cumsum(lengths) - lengths
    change = np.ones(len(ids), dtype=bool)
    change[1:] = groups[1:] != groups[:-1]
    change[begins[lengths > 0]] = True
    starts = np.flatnonzero(change)
    stops = np.append(starts[1:], len(ids))
    tags = np.searchsorted(begins, starts, side="right") - 1
    run_groups = groups[starts]
    _, first, count = np.unique(tags * (int(groups.max()) + 1) + run_groups, return_index=True, return_counts=True)
    scattered = set(tags[first[count > 1]].tolist())  # axes where a group comes back after another
    span = np.arange(int(lengths.max()))
    span.flags.writeable = channels.flags.writeable = False  # members share them: read-only, as before in effect
    members: dict[int, list[Member]] = {}
    done = -1
    local = (starts - begins[tags]).tolist()
    for s, e, p, t, g in zip(starts.tolist(), stops.tolist(), local, tags.tolist(), run_groups.tolist()):
        name, axis = keys[t]
        if t not in scattered:
            members.setdefault(g, []).append(Member(name, axis, span[p:p + e - s], channels[s:e]))
        elif t != done:
            done = t
            _split_sorted(members, name, axis, groups[begins[t]:begins[t] + lengths[t]],
                          channels[begins[t]:begins[t] + lengths[t]])
    return members


def _split_sorted(members: dict[int, list[Member]], name: str, axis: int, groups: np.ndarray,
                  channels: np.ndarray) -> None:
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    cuts = np.flatnonzero(sorted_groups[1:] != sorted_groups[:-1]) + 1
    for g, pos in zip(sorted_groups[np.append(0, cuts)].tolist(), np.split(order, cuts)):
        members.setdefault(g, []).append(Member(name, axis, pos, channels[pos]))
