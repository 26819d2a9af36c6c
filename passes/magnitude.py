"""Weight-only importance criteria: L1, L2, BN scale, FPGM, random.

Each maps an Analysis to {class id: score}; higher means more important. Scores of one layer's
slices are divided by that layer's mean so layers of different scale can be ranked together;
a class's score is the mean over every parameter slice it owns (the group aggregation).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError

Scores = dict[int, float]


def _slices(analysis: Analysis, param: str, axis: int) -> np.ndarray:
    w = np.asarray(analysis.graph.constants[param], dtype=np.float32)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def _aggregate(analysis: Analysis, per_binding: Callable[[np.ndarray], np.ndarray], roles: tuple[str, ...],
               only: Callable | None = None) -> Scores:
    total: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for b in analysis.bindings:
        if b.role not in roles or (only is not None and not only(b)):
            continue
        rows = _slices(analysis, b.param, b.axis)
        if rows.shape[1] == 0:
            continue
        s = per_binding(rows)
        mean = s.mean()
        if mean > 0:
            s = s / mean
        roots = analysis.roots[b.tensor][: len(analysis.roots[b.tensor]) // b.divisor]
        for r, v in zip(roots.tolist(), s.tolist()):
            total[r] += v
            count[r] += 1
    return {r: total[r] / count[r] for r in total}


def _with_fallback(analysis: Analysis, fn: Callable[[np.ndarray], np.ndarray]) -> Scores:
    """Score from the producing filters; classes with none (e.g. fed by a frozen op) use consumers."""
    scores = _aggregate(analysis, fn, ("out",))
    missing = any(r not in scores for g in analysis.prunable_groups for r in g.classes)
    if missing:
        for r, v in _aggregate(analysis, fn, ("in",)).items():
            scores.setdefault(r, v)
    return scores


def l1(analysis: Analysis, **_: object) -> Scores:
    return _with_fallback(analysis, lambda rows: np.abs(rows).sum(1))


def l2(analysis: Analysis, **_: object) -> Scores:
    return _with_fallback(analysis, lambda rows: np.sqrt((rows ** 2).sum(1)))


def _gammas(analysis: Analysis) -> set[str]:
    return {node.inputs[1] for node in analysis.graph.nodes
            if node.op_type in ("BatchNormalization", "InstanceNormalization") and len(node.inputs) > 1}


def bn_scored_classes(analysis: Analysis) -> set[int]:
    """Classes with a BatchNorm/InstanceNorm scale of their own: the ones bn_scale really scores."""
    gammas = _gammas(analysis)
    out: set[int] = set()
    for b in analysis.bindings:
        if b.role == "coupled" and b.param in gammas:
            roots = analysis.roots[b.tensor]
            out.update(roots[: len(roots) // b.divisor].tolist())
    return out


def bn_scale(analysis: Analysis, **_: object) -> Scores:
    """|gamma| of the BatchNorm that follows a layer (network slimming); other classes fall back to
    l1 (reported per group by graphprune.passes.methods.method_coverage)."""
    gammas = _gammas(analysis)
    if not gammas:
        raise GraphpruneError(
            "method bn_scale needs BatchNormalization layers; this model has none "
            "(exported in eval mode, BN is folded into convs): use l1/l2/fpgm"
        )
    scores = _aggregate(analysis, lambda rows: np.abs(rows[:, 0]), ("coupled",), only=lambda b: b.param in gammas)
    for r, v in l1(analysis).items():
        scores.setdefault(r, v)
    return scores


def _fpgm_rows(rows: np.ndarray) -> np.ndarray:
    """Sum of distances to the layer's other filters: near the geometric median = replaceable."""
    if rows.shape[0] < 2 or rows.shape[1] < 2:
        return np.abs(rows).sum(1)
    sq = (rows ** 2).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
    return np.sqrt(d2).sum(1)


def fpgm(analysis: Analysis, **_: object) -> Scores:
    return _with_fallback(analysis, _fpgm_rows)


def random(analysis: Analysis, seed: int = 0, **_: object) -> Scores:
    rng = np.random.default_rng(seed)
    classes = [r for g in analysis.groups for r in g.classes]
    return dict(zip(classes, rng.random(len(classes)).tolist()))


CRITERIA: dict[str, Callable[..., Scores]] = {
    "l1": l1,
    "l2": l2,
    "bn_scale": bn_scale,
    "fpgm": fpgm,
    "random": random,
}
