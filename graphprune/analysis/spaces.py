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
    """Channel space of one tensor. axis is None for dense form.

    Dense ids are stored *compressed*: an array of the tensor's rank whose every dim is either the
    tensor's dim or 1 (broadcast), so positions that only repeat labels (spatial dims, typically)
    cost nothing and analysis memory and time do not grow with image size.
    """

    axis: int | None
    ids: np.ndarray


# more labels than this in one layout op are not tracked element by element: the op is frozen
MAX_LABELS = 1 << 16


class TooLarge(Exception):
    """A layout op would need more labels than MAX_LABELS."""


def dense_labels(space: Space, shape: tuple[int, ...]) -> np.ndarray:
    """Compressed labels (broadcastable to `shape`), never a full per-element array."""
    if space.axis is None:
        return space.ids
    view = [1] * len(shape)
    view[space.axis] = len(space.ids)
    return space.ids.reshape(view)


def broadcastable(labels: np.ndarray, shape: tuple[int, ...]) -> bool:
    return labels.ndim == len(shape) and all(a in (1, b) for a, b in zip(labels.shape, shape))


def resolve_axis(labels: np.ndarray, axis: int, size: int | None = None) -> np.ndarray | None:
    """Ids along `axis` if every slice along it carries exactly one id, else None.

    `size` is the tensor's length along `axis` (labels may hold 1 there, broadcast).
    """
    if labels.ndim == 0:
        return None
    size = labels.shape[axis] if size is None else size
    if labels.shape[axis] == 1 and size != 1:
        uniq = np.unique(labels)
        return np.full(size, uniq[0], dtype=np.int64) if len(uniq) == 1 else None
    moved = np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1)
    if moved.shape[1] == 0:
        return None
    first = moved[:, :1]
    if not np.array_equal(np.broadcast_to(first, moved.shape), moved):
        return None
    return np.ascontiguousarray(first[:, 0])


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split a reshape into runs of source and target dims with equal products (C order)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gi: list[int] = []
        gj: list[int] = []
        pi = pj = 1
        if i < len(src):
            pi *= src[i]
            gi.append(i)
            i += 1
        if j < len(dst):
            pj *= dst[j]
            gj.append(j)
            j += 1
        while pi != pj:
            if pi < pj and i < len(src):
                pi *= src[i]
                gi.append(i)
                i += 1
            elif pj < pi and j < len(dst):
                pj *= dst[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def reshape_labels(labels: np.ndarray, src: tuple[int, ...], dst: tuple[int, ...]) -> np.ndarray:
    """Reshape compressed labels of a `src`-shaped tensor to `dst`, keeping broadcast dims compressed.

    A run of dims that is broadcast on input stays broadcast on output; other runs are materialised
    (only those: a channel dim split into groups costs its own size, not the image's).
    """
    if 0 in src or 0 in dst:
        raise TooLarge("empty tensor")
    groups = _reshape_groups(tuple(src), tuple(dst))
    if groups is None:
        raise TooLarge("reshape does not factor")
    expand: list[int] = []
    out: list[int] = []
    for gi, gj in groups:
        if all(labels.shape[k] == 1 for k in gi):
            expand += [1] * len(gi)
            out += [1] * len(gj)
        else:
            expand += [src[k] for k in gi]
            out += [dst[k] for k in gj]
    n = 1
    for d in expand:
        n *= d
    if n > MAX_LABELS:
        raise TooLarge(f"{n} labels")
    return np.broadcast_to(labels, tuple(expand)).reshape(tuple(out))
