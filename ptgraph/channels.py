"""Channel types: every channel of every tensor is an integer *element*; coupled elements are unified.

A space is born where channels are born (a parameter axis: a conv's output channels, a
linear's input features, ...): `ChannelSpace.new(n)` hands out n fresh elements. A tensor's
type maps each tracked axis to the array of elements along it (`TensorType`). Rules unify
elements that must be pruned together; a union-find over all elements, vectorised with numpy,
keeps the classes. One class of elements is one prunable *channel*.
"""
from __future__ import annotations

import numpy as np

# axis -> element ids along that axis (len == size of that axis). Empty: the tensor's shape never changes.
TensorType = dict[int, np.ndarray]


class ChannelSpace:
    """Elements, their union-find, and what is known about them (frozen with a reason, inexact)."""

    def __init__(self) -> None:
        # per element, in buffers that grow geometrically (a model has thousands of spaces); the
        # first _n entries are in use
        self._n = 0
        self._parent = np.zeros(0, dtype=np.int64)
        self._space = np.zeros(0, dtype=np.int64)  # which birth (space) each element came from
        self._frozen = np.zeros(0, dtype=np.int64)  # index into reasons, -1: not frozen
        self._inexact = np.zeros(0, dtype=np.int64)
        self.n_spaces = 0
        self.reasons: list[str] = []

    def __setstate__(self, state: dict) -> None:
        if "_n" not in state:  # pickled before the buffers: exact-length arrays
            state.pop("_buffers", None)
            state["_n"] = len(state["_parent"])
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self._n

    def new(self, n: int) -> np.ndarray:
        start, end = self._n, self._n + n
        if end > len(self._parent):
            cap = max(end, 2 * start, 1024)
            for attr in ("_parent", "_space", "_frozen", "_inexact"):
                old = getattr(self, attr)
                buf = np.zeros(cap, dtype=np.int64)
                buf[:start] = old[:start]
                setattr(self, attr, buf)
        ids = np.arange(start, end, dtype=np.int64)
        self._parent[start:end] = ids
        self._space[start:end] = self.n_spaces
        self._frozen[start:end] = -1
        self._inexact[start:end] = -1
        self._n = end
        self.n_spaces += 1
        return ids

    def find(self, ids: np.ndarray) -> np.ndarray:
        parent = self._parent
        roots = parent[ids]
        while True:
            up = parent[roots]
            if (up == roots).all():
                break
            roots = up
        parent[ids] = roots  # path compression for the queried elements
        return roots

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        """Element a[i] and b[i] become one channel, for every i."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        assert a.shape == b.shape, (a.shape, b.shape)
        while True:
            ra, rb = self.find(a), self.find(b)
            diff = ra != rb
            if not diff.any():
                return
            ra, rb = ra[diff], rb[diff]
            # colliding writes lose links; the loop re-checks until every pair agrees
            self._parent[np.maximum(ra, rb)] = np.minimum(ra, rb)

    def unify_all(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if len(ids) > 1:
            self.unify(ids[:-1], ids[1:])

    def roots(self) -> np.ndarray:
        return self.find(np.arange(self._n, dtype=np.int64))

    def space_of(self, ids: np.ndarray) -> np.ndarray:
        return self._space[ids]

    def _note(self, table: np.ndarray, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        fresh = ids[table[ids] < 0]
        if len(fresh):
            self.reasons.append(reason)
            table[fresh] = len(self.reasons) - 1  # the first reason wins

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        self._note(self._frozen, ids, reason)

    def mark_inexact(self, ids: np.ndarray, reason: str) -> None:
        self._note(self._inexact, ids, reason)

    def freeze_type(self, t: TensorType, reason: str) -> None:
        for ids in t.values():
            self.freeze(ids, reason)

    def frozen_index(self, ids: np.ndarray) -> np.ndarray:
        """Per element, the index into `reasons` of why it was frozen, or -1."""
        return self._frozen[ids]

    def frozen_reason(self, ids: np.ndarray) -> str | None:
        """The first reason any of these elements was frozen for, or None."""
        idx = self._frozen[ids]
        idx = idx[idx >= 0]
        return self.reasons[int(idx.min())] if len(idx) else None

    def reasons_by(self, ids: np.ndarray, labels: np.ndarray, inexact: bool = False) -> dict[int, str]:
        """label -> the first reason any of the elements `ids` with that label was frozen (or marked
        inexact) for: frozen_reason per label, in one sort instead of one call per label."""
        idx = (self._inexact if inexact else self._frozen)[ids]
        hit = idx >= 0
        labels, idx = labels[hit], idx[hit]
        order = np.lexsort((idx, labels))
        labels, idx = labels[order], idx[order]
        first = np.ones(len(labels), dtype=bool)
        first[1:] = labels[1:] != labels[:-1]
        return {g: self.reasons[i] for g, i in zip(labels[first].tolist(), idx[first].tolist())}

    def inexact_reason(self, ids: np.ndarray) -> str | None:
        idx = self._inexact[ids]
        idx = idx[idx >= 0]
        return self.reasons[int(idx.min())] if len(idx) else None


def shift_axes(t: TensorType, offset: int, start: int = 0) -> TensorType:
    """Axes >= start move by offset (for unsqueeze-like ops)."""
    return {(a + offset if a >= start else a): ids for a, ids in t.items()}
