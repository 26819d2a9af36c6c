"""Channel spaces: which channel "elements" each tensor carries, and a union-find tying them together.

A tensor's space is either *axis form* (one element id per position along its channel axis) or
*dense form* (an element id for every position of the tensor, used between layout ops such as
Reshape/Transpose). Dense labels are resolved back to an axis whenever each slice along that axis
holds a single id. Element ids are merged in a union-find; a merged set is one *channel class*,
the unit that is kept or removed as a whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class UnionFind:
    """Union-find over integer ids with a frozen flag (and first reason) per set."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        reason = self.frozen.pop(rb, None)
        if reason is not None and ra not in self.frozen:
            self.frozen[ra] = reason

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def freeze(self, ids: np.ndarray, reason: str) -> None:
        for x in np.unique(ids).tolist():
            r = self.find(x)
            if r not in self.frozen:
                self.frozen[r] = reason

    def roots(self, ids: np.ndarray) -> np.ndarray:
        find = self.find
        return np.fromiter((find(x) for x in ids.tolist()), dtype=np.int64, count=len(ids))


@dataclass
class Space:
    """Channel space of one tensor. axis is None for dense form (ids has the tensor's shape)."""

    axis: int | None
    ids: np.ndarray


def dense_labels(space: Space, shape: tuple[int, ...]) -> np.ndarray:
    if space.axis is None:
        return space.ids
    view = [1] * len(shape)
    view[space.axis] = len(space.ids)
    return np.broadcast_to(space.ids.reshape(view), shape)


def resolve_axis(labels: np.ndarray, axis: int) -> np.ndarray | None:
    """Ids along `axis` if every slice along it carries exactly one id, else None."""
    if labels.ndim == 0:
        return None
    moved = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1)
    if moved.shape[1] == 0:
        return None
    first = moved[:, :1]
    if not np.array_equal(np.broadcast_to(first, moved.shape), moved):
        return None
    return np.ascontiguousarray(first[:, 0])
