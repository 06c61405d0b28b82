"""The `config` allocation: plans whose pruned shape a model's config can still express.

A config (Hugging Face's, or any hand-written `Block(width, heads)` stack) holds one number per kind of width:
the hidden size, the heads and the MLP units of *every* layer. So the groups that are "the same" across the
repeated blocks of a ModuleList must keep the same number of channels. They are found structurally: a group
whose members all live in one element of a ModuleList (`layers.3.mlp...`) belongs to the family of groups with
the same members under the other indices (`layers.*.mlp...`, same axes, same channels per member); a group
whose members span several elements (the residual stream) is a width of its own; a prunable group outside
every block (a pooler) is no width a config holds, so it is left whole. A group whose channels are several
rows each (attention heads, or a kv head with its query heads) is cut a whole channel at a time; the others
in multiples of `multiple`. Where the config derives the heads' width from the hidden size (GPT-2, BERT,
ViT: hidden = heads x head dim), the stream follows the heads (`tie`).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ptgraph.errors import UserError
from ptgraph.passes import ChannelAnalysis, PrunePlan, keep_every_tensor

_INDEX = re.compile(r"\.(\d+)(?=\.)")


@dataclass(frozen=True)
class Knob:
    """One width of the config: groups that always keep the same number of channels."""

    groups: tuple[int, ...]
    unit: int  # channels a step removes: 1 for heads, `multiple` for widths
    heads: bool  # each channel is several rows (an attention head)
    followers: tuple[tuple[int, int], ...] = ()  # (group, ratio): keeps ratio x these channels (a tied stream)
    stream: bool = False  # one group spanning several blocks (the hidden size)


@dataclass(frozen=True)
class Blocks:
    knobs: tuple[Knob, ...]
    outside: frozenset[int]  # prunable groups no config width holds: never cut under this allocation
    attrs: tuple[tuple[str, int, int], ...] = ()  # (config attribute, group, per channel): attribute = channels x per
    pinned: tuple[tuple[str, int], ...] = ()  # config attributes written as they are (a derived head_dim made explicit)


def _site(name: str) -> tuple[int, ...]:
    return tuple(int(i) for i in _INDEX.findall("." + name))


def _pattern(name: str) -> str:
    return _INDEX.sub(".*", "." + name)


def find_blocks(analysis: ChannelAnalysis, multiple: int = 8, tie: bool = False) -> Blocks:
    """The widths a config holds, from the analysis alone (names and shapes, never the model's class)."""
    if multiple < 1:
        raise UserError(f"the width multiple must be at least 1, not {multiple}")
    families: dict[tuple, list[int]] = defaultdict(list)
    heads_of: dict[tuple, bool] = {}
    streams, outside = [], set()
    for g in analysis.groups:
        if not g.prunable:
            continue
        sites = {_site(m.name) for m in g.members}
        if sites == {()}:
            outside.add(g.id)
        elif len(sites) > 1:
            streams.append(g.id)
        else:
            key = (g.size, tuple(sorted({(_pattern(m.name), m.axis, len(m.positions) // g.size) for m in g.members})))
            families[key].append(g.id)
            heads_of[key] = any(len(m.positions) != g.size for m in g.members)
    knobs = [Knob(tuple(sorted(ids)), 1 if heads_of[k] else multiple, heads_of[k]) for k, ids in families.items()]
    knobs += [Knob((gid,), multiple, False, stream=True) for gid in streams]
    if tie:
        heads = [k for k in knobs if k.heads]
        if len(heads) != 1 or len(streams) != 1:
            raise UserError(f"this model's config ties its hidden size to its heads, but the model has {len(heads)} "
                            f"families of attention heads and {len(streams)} residual streams (one of each needed); "
                            f"prune it with another allocation and save it with torch.save or ONNX")
        size = {g.id: g.size for g in analysis.groups}
        stream, head = streams[0], heads[0]
        if size[stream] % size[head.groups[0]]:
            raise UserError(f"this model's config ties its hidden size ({size[stream]}) to its heads "
                            f"({size[head.groups[0]]}), which do not divide it")
        knobs = [k for k in knobs if k is not head and k.groups != (stream,)]
        knobs.append(Knob(head.groups, 1, True, ((stream, size[stream] // size[head.groups[0]]),)))
    return Blocks(tuple(knobs), frozenset(outside))


def _count(sizes: dict[int, int], knob: Knob) -> int:
    counts = {sizes[g] for g in knob.groups}
    assert len(counts) == 1, f"the groups {knob.groups} of one config width have sizes {counts}"
    return counts.pop()


def _top(norms: np.ndarray, k: int) -> tuple[int, ...]:
    return tuple(sorted(np.argsort(-norms, kind="stable")[:k].tolist()))


def _plan_of(analysis: ChannelAnalysis, blocks: Blocks, norms: dict[int, np.ndarray], counts: list[int]) -> PrunePlan:
    """Every group of knob i keeps its counts[i] largest norms (a tied stream counts[i] x ratio)."""
    keep = {}
    for knob, k in zip(blocks.knobs, counts):
        pairs = [(g, k) for g in knob.groups] + [(f, k * ratio) for f, ratio in knob.followers]
        for gid, n in pairs:
            if gid in norms and n < len(norms[gid]):
                keep[gid] = _top(norms[gid], n)
    plan = keep_every_tensor(analysis, PrunePlan(keep), norms)
    assert plan.keep == keep, "a config width emptied a tensor"
    return plan


def cut_plans(analysis: ChannelAnalysis, blocks: Blocks, norms: dict[int, np.ndarray], dense: dict[int, int],
              floors: dict[int, int]) -> tuple[Callable[[int], PrunePlan], int]:
    """Plans that remove more as their index grows (plan_of, how many): each step takes one unit from the width
    that keeps the largest share of its dense size after it (uniform across widths, as `uniform` is across
    groups), never under a group's floor; every group of a width keeps the same count, its largest norms."""
    sizes = {gid: len(n) for gid, n in norms.items()}
    blocks = Blocks(tuple(k for k in blocks.knobs if all(g in sizes for g in k.groups)), blocks.outside)
    knobs = blocks.knobs
    counts = [_count(sizes, k) for k in knobs]

    def floor(knob: Knob) -> int:
        return max([1] + [floors.get(g, 1) for g in knob.groups]
                   + [math.ceil(floors.get(f, 1) / ratio) for f, ratio in knob.followers])

    def step(i: int) -> int | None:
        nxt = (counts[i] - 1) // knobs[i].unit * knobs[i].unit
        return nxt if nxt >= floor(knobs[i]) else None

    states = [tuple(counts)]
    while True:
        options = [(nxt / dense[k.groups[0]], -i, i, nxt) for i, k in enumerate(knobs) if (nxt := step(i)) is not None]
        if not options:
            break
        _, _, i, nxt = max(options)
        counts[i] = nxt
        states.append(tuple(counts))
    return (lambda i: _plan_of(analysis, blocks, norms, list(states[i]))), len(states)


def expressible(analysis: ChannelAnalysis, blocks: Blocks, plan: PrunePlan, norms: dict[int, np.ndarray]) -> PrunePlan:
    """The nearest plan at or above `plan` that a config expresses: every width keeps as many channels as the
    group of it that keeps most, rounded up to its unit (a tied stream and its heads: whichever keeps more).
    It keeps everything `plan` keeps, so it removes only channels `plan` removes."""
    sizes = {gid: len(n) for gid, n in norms.items()}
    knobs = [k for k in blocks.knobs if all(g in sizes for g in k.groups)]
    counts = []
    for knob in knobs:
        size = _count(sizes, knob)
        k = max(len(plan.keep.get(g, range(size))) for g in knob.groups)
        k = min(size, math.ceil(k / knob.unit) * knob.unit)
        for f, ratio in knob.followers:
            k = max(k, math.ceil(len(plan.keep.get(f, range(sizes[f]))) / ratio))
        counts.append(k)
    shaped = _plan_of(analysis, Blocks(tuple(knobs), blocks.outside), norms, counts)
    covered = {g for k in knobs for g in k.groups + tuple(f for f, _ in k.followers)}
    return PrunePlan({**{g: k for g, k in plan.keep.items() if g not in covered}, **shaped.keep})


def config_blocks(analysis: ChannelAnalysis, model: Any, multiple: int = 8) -> Blocks:
    """`find_blocks`; for a Hugging Face model, fitted to its config (integrations/hf_config.py): the stream tied
    to the heads where the config derives one from the other, each width named by its config attribute."""
    if hasattr(model, "config") and hasattr(model.config, "to_dict"):
        from ptgraph.integrations.hf_config import fit_blocks

        return fit_blocks(model, analysis, multiple)
    return find_blocks(analysis, multiple)
