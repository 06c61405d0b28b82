"""PrunePlan: which channels of which group to keep. Plain data, serialisable, checked against groups."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from ptgraph.errors import UserError
from ptgraph.passes.groups import ChannelGroup


@dataclass(frozen=True)
class PrunePlan:
    """group id -> sorted indices of the channels to KEEP; groups not named keep everything."""

    keep: Mapping[int, tuple[int, ...]]

    def to_json(self) -> str:
        return json.dumps({str(g): list(k) for g, k in sorted(self.keep.items())})

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        return cls({int(g): tuple(int(i) for i in k) for g, k in json.loads(text).items()})

    def check(self, groups: Iterable[ChannelGroup]) -> None:
        """Raise UserError if the plan names a group that is missing or frozen, or keeps no channel."""
        by_id = {g.id: g for g in groups}
        for gid, keep in self.keep.items():
            g = by_id.get(gid)
            if g is None:
                raise UserError(f"the plan names group {gid}, which the model does not have; build plans from the current groups")
            if not g.prunable and len(keep) != g.size:
                raise UserError(f"the plan prunes group {gid}, which is frozen ({g.reason}); leave it out of the plan")
            if not keep:
                raise UserError(f"the plan keeps no channel of group {gid}; keep at least one")
            if list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= g.size:
                raise UserError(f"the plan's channels for group {gid} must be sorted, unique and below {g.size}")


def random_plan(groups: Iterable[ChannelGroup], ratio: float, seed: int = 0, exact_only: bool = True) -> PrunePlan:
    """Drop `ratio` of the channels, chosen at random, in every prunable (and, by default, exact) group."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"ratio {ratio} is outside [0, 1); pass the share of channels to drop, e.g. 0.3")
    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        if not g.prunable or (exact_only and not g.exact) or g.size < 2:
            continue
        n_keep = max(1, g.size - math.floor(g.size * ratio))
        if n_keep < g.size:
            kept = np.zeros(g.size, dtype=bool)
            kept[rng.choice(g.size, n_keep, replace=False)] = True
            for m in g.members:  # no tensor may lose every channel it holds of this group
                if len(m.channels) and not kept[m.channels].any():
                    kept[rng.choice(np.unique(m.channels))] = True
            if not kept.all():
                keep[g.id] = tuple(np.nonzero(kept)[0].tolist())
    return PrunePlan(keep)
