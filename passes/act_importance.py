"""Activation-aware channel importance: what a channel contributes to its consumers' outputs.

Weight-magnitude criteria see neither activations nor folded biases. On real models most channels
they remove are constant and non-zero (a folded BN bias, a learnable affine after hardswish): such a
channel carries no information, but zeroing it shifts every later pre-activation. With the mean
compensated (passes/compensate.py) a channel c read by consumer weights W[:, c] changes the
consumer's output by W[:, c] (a_c - E a_c), whose expected energy is, ignoring cross-channel and
cross-tap correlation,

    e_c = Var(a_c) * ||W[:, c]||^2            (E[a_c^2] * ||W[:, c]||^2 without compensation).

A channel's score is its share e_c / sum_c' e_c' of the consumer's output energy (a scale-free
relative error, so layers can be ranked together), summed over every consumer of its coupled class
(a residual channel read by five layers counts five times). Dead and constant channels score 0.

Statistics are streamed (`ChannelStats`): per channel position a float64 sum and sum of squares.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from graphprune.analysis.groups import Analysis

Scores = dict[int, float]


class ChannelStats:
    """Streaming per-channel first and second moments of some tensors (float64, O(channels) memory)."""

    def __init__(self, axes: dict[str, int]) -> None:
        self.axes = dict(axes)
        self.sum: dict[str, np.ndarray] = {}
        self.sumsq: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = defaultdict(int)

    def update(self, values: dict[str, np.ndarray]) -> None:
        for t, v in values.items():
            if t not in self.axes:
                continue
            a = np.moveaxis(np.asarray(v), self.axes[t] % np.ndim(v), 0)
            a = a.reshape(a.shape[0], -1).astype(np.float64)
            s, sq = a.sum(1), np.einsum("ij,ij->i", a, a)
            if t in self.sum:
                self.sum[t] += s
                self.sumsq[t] += sq
            else:
                self.sum[t], self.sumsq[t] = s, sq
            self.count[t] += a.shape[1]

    def mean(self, t: str) -> np.ndarray:
        return self.sum[t] / max(self.count[t], 1)

    def second_moment(self, t: str) -> np.ndarray:
        return self.sumsq[t] / max(self.count[t], 1)

    def var(self, t: str) -> np.ndarray:
        return np.maximum(self.second_moment(t) - self.mean(t) ** 2, 0.0)


def stat_tensors(analysis: Analysis) -> dict[str, int]:
    """Tensor -> channel axis for every consumer input (what the criterion and compensation need)."""
    out = {}
    for b in analysis.bindings:
        if b.role == "in":
            out[b.tensor] = int(analysis.ctx.spaces[b.tensor].axis)
    return out


def column_energy(analysis: Analysis, binding) -> np.ndarray:
    """||W[:, c]||^2 for every channel position c of the binding's tensor (all groups)."""
    w = np.asarray(analysis.graph.constants[binding.param], dtype=np.float64)
    moved = np.moveaxis(w, binding.axis, 0)  # [in per group, ...]
    n_pos = len(analysis.roots[binding.tensor])
    g = binding.divisor
    if g == 1:
        return (moved.reshape(moved.shape[0], -1) ** 2).sum(1)
    # grouped conv: weight [out, in/g, *k]; channel g*cin_g + i is read by group g's outputs only
    cin_g = w.shape[1]
    cout_g = w.shape[0] // g
    sq = (w.reshape(g, cout_g, cin_g, -1) ** 2).sum(axis=(1, 3))  # [g, cin_g]
    if sq.size != n_pos:
        raise ValueError(f"grouped weight '{binding.param}' does not match '{binding.tensor}'")
    return sq.reshape(-1)


def act_scores(analysis: Analysis, stats: ChannelStats, centered: bool = True) -> Scores:
    """Class id -> summed share of its consumers' output energy (see module docstring)."""
    total: dict[int, float] = defaultdict(float)
    for b in analysis.bindings:
        if b.role != "in" or b.tensor not in stats.sum:
            continue
        moment = stats.var(b.tensor) if centered else stats.second_moment(b.tensor)
        e = moment * column_energy(analysis, b)
        s = e.sum()
        share = e / s if s > 0 else np.zeros_like(e)
        roots = analysis.roots[b.tensor]
        for r, v in zip(roots.tolist(), share.tolist()):
            total[r] += v
    scores: Scores = dict(total)
    # classes no consumer reads (e.g. only feeding a graph output): rank them by weights, below none
    missing = [r for g in analysis.prunable_groups for r in g.classes if r not in scores]
    if missing:
        from graphprune.passes.magnitude import l2

        fallback = l2(analysis)
        top = max(scores.values(), default=1.0)
        for r in missing:
            scores[r] = top * (1.0 + fallback.get(r, 1.0))
    return scores
