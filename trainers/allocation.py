"""Which channels a cut takes: pure functions of the channel norms, shared by the steering and the final cut."""
from __future__ import annotations

import math

import numpy as np


def keep_channels(norms: np.ndarray, threshold: float, round_to: int, extra: float = 0.0,
                  at_least: int = 1) -> np.ndarray:
    """Indices to keep: norms at or over threshold, plus `extra` of the others, at least `at_least`, rounded up
    to a multiple of round_to (largest norms win), never fewer than one rounding unit (or the whole group, if smaller)."""
    size = len(norms)
    n = int((norms >= threshold).sum())
    n = max(at_least, n + math.ceil(extra * (size - n)))
    unit = max(1, round_to)
    n = min(size, max(unit, math.ceil(n / unit) * unit))
    return np.sort(np.argsort(-norms, kind="stable")[:n])


def relative_norms(norms: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each channel's norm over its group's median live norm: comparable across groups of different scale.
    Channels at zero stay at zero."""
    out = {}
    for gid, n in norms.items():
        live = n[n > 0]
        out[gid] = n / (float(np.median(live)) if len(live) else 1.0)
    return out


def uniform_order(norms: dict[int, np.ndarray], dense_sizes: dict[int, int], tilt: dict[int, float] | None = None,
                  floors: dict[int, int] | None = None) -> list[int]:
    """The groups in the order their channels leave under the uniform allocation, one entry per channel: each
    removal goes to the group that keeps the largest share of its dense channels after it (ties: the group
    whose next channel has the smallest norm relative to its group's), so that plan i is the uniform spread
    of i removals, one channel finer than a common share would be. With `tilt`, each group's share is divided
    by its tilt first (over 1: cut later, under 1: sooner), and no group goes under its entry in `floors`."""
    relative = relative_norms(norms)
    events = []
    for gid, n in norms.items():
        ranked = np.sort(relative[gid])
        dense, t = dense_sizes[gid], (tilt or {}).get(gid, 1.0)
        last = min(len(n) - 1, len(n) - (floors or {}).get(gid, 1))
        events += [(-(len(n) - j - 1) / dense / t, float(ranked[j]), gid) for j in range(max(0, last))]
    return [gid for _, _, gid in sorted(events)]
