"""Discriminant Information (DI) channel pruning (Hou & Kung, "A feature-map discriminant
perspective for pruning deep neural networks").

For a layer's features X (N samples x d dims) with labels, with total scatter S = Xc^T Xc and
between-class scatter S_B = sum_k N_k (mu_k - mu)(mu_k - mu)^T,

    DI(X) = tr((S + rho I)^-1 S_B)

with the ridge rho a fixed fraction of the mean feature variance (scale-free). DI never increases
when feature dimensions are removed (the non-decreasing property), so the DI lost when a channel's
dims are dropped is a valid importance. Each channel contributes a block of p*p dims (its feature
map average-pooled to p x p; token layouts pooled to p*p positions; dense features one dim).

Incremental linear algebra (why this scales): with A = (S + rho I)^-1 over the kept dims and the
block c left out, the padded inverse of the reduced matrix is A - A_:c A_cc^-1 A_c: (Schur), so

    DI - DI_-c = tr(A_cc^-1 (A S_B A)_cc)

needs only diagonal blocks of A and of H = M A, where S_B = M^T M (M: one row per class). Removing
c is a rank-|c| downdate of A, never a re-inversion. A itself is never formed: with S = F^T F
(F: the centred pooled features when there are fewer samples than dims, else a square root of the
streamed scatter), Woodbury gives A = (I - F^T Z) / rho with Z = (rho I + F F^T)^-1 F, and a
removal updates Z, H and the diagonal blocks of A in O((rows + classes) * |c| * d). Everything is
float64; the state is rebuilt from scratch whenever a quarter of a map's dims are gone, which
both compacts the arrays and resets rounding.

The budgeted structure search is greedy: repeatedly remove the class whose relative DI loss
(summed over the feature maps it lives on, each divided by that map's full DI) per unit of cost
saved is smallest, until the cost target is met. Only the groups whose losses or savings changed
are re-evaluated after a removal. Plans are identical to the original O(d^3)-per-removal search
(tests/test_di_equivalence.py against the frozen copy in tests/di_reference.py).

Features are streamed (`FeatureStats`): per batch only class sums and either the rows or the
scatter are kept, whichever is smaller; the tensors come from forward hooks (PyTorch) or from
`graphprune.capture.iter_tensors` (onnxruntime), on each tensor's own channel axis.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphprune.passes.channels import ChannelSpace, channel_axis, feature_tensors

Features = dict[str, np.ndarray]  # tensor -> (N, C, q) pooled feature maps
Say = Callable[[str], None]


# -- closed forms (small, direct; used by tests and for one-off scores) -------------------------------
def scatter(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Total scatter S and between-class scatter S_B of rows x (N, d)."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(0)
    xc = x - mu
    s = xc.T @ xc
    sb = np.zeros_like(s)
    for k in np.unique(labels):
        xk = x[labels == k]
        dk = xk.mean(0) - mu
        sb += len(xk) * np.outer(dk, dk)
    return s, sb


def _ridge(s: np.ndarray, rel: float) -> float:
    return _ridge_of_trace(float(np.trace(s)), len(s), rel)


def _ridge_of_trace(trace: float, d: int, rel: float) -> float:
    return rel * max(trace / max(d, 1), 1e-12)


def discriminant_information(x: np.ndarray, labels: np.ndarray, rho: float = 1e-2) -> float:
    """DI of features x (N, d); rho is relative to the mean variance (scale-free)."""
    s, sb = scatter(x, labels)
    a = np.linalg.inv(s + _ridge(s, rho) * np.eye(len(s)))
    return float(np.sum(a * sb))


def leave_one_out_di(s: np.ndarray, sb: np.ndarray, blocks: list[np.ndarray], ridge: float) -> tuple[float, np.ndarray]:
    """DI with all dims, and DI with each block of dims left out (blocks: index arrays into d).

    DI_-c = DI - tr(A_cc^-1 (A S_B A)_cc) with A = (S + ridge I)^-1 (see the module docstring).
    """
    a = np.linalg.inv(s + ridge * np.eye(len(s)))
    aba = a @ sb @ a
    full = float(np.sum(a * sb))
    out = np.empty(len(blocks))
    for i, c in enumerate(blocks):
        ix = np.ix_(c, c)
        out[i] = full - float(np.trace(np.linalg.solve(a[ix], aba[ix])))
    return full, out


def channel_di_loss(feat: np.ndarray, labels: np.ndarray, rho: float = 1e-2) -> np.ndarray:
    """DI lost when each channel of feat (N, C, q) is removed: the per-layer importance."""
    n, c, q = feat.shape
    s, sb = scatter(feat.reshape(n, c * q), labels)
    blocks = [np.arange(i * q, (i + 1) * q) for i in range(c)]
    full, loo = leave_one_out_di(s, sb, blocks, _ridge(s, rho))
    return full - loo


# -- streaming statistics ----------------------------------------------------------------------------
class FeatureStats:
    """Running DI statistics of one feature map: class sums plus rows or scatter, whichever is smaller.

    Rows are kept while there are fewer samples than dims (memory N*d < d*d, and the search works in
    sample space); past that they are folded into a d x d scatter and never kept again. Values are
    shifted by the first batch's mean before accumulating so the scatter does not cancel
    catastrophically on post-ReLU features with large means.
    """

    def __init__(self, channels: int, q: int, ridge_scale: float = 1.0) -> None:
        self.channels, self.q, self.d = channels, q, channels * q
        self.ridge_scale = ridge_scale
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(self.d)
        self.rows: list[np.ndarray] | None = []
        self.gram: np.ndarray | None = None
        self.class_sum: dict[int, np.ndarray] = {}
        self.class_n: dict[int, int] = {}

    def add(self, feat: np.ndarray, labels: np.ndarray) -> None:
        """Fold a batch of pooled features (b, C, q) with their labels (b,) into the statistics."""
        x = np.asarray(feat, dtype=np.float64).reshape(len(feat), self.d)
        if self.shift is None:
            self.shift = x.mean(0)
        xs = x - self.shift
        self.n += len(xs)
        self.total += xs.sum(0)
        labels = np.asarray(labels)
        for k in np.unique(labels).tolist():
            sel = labels == k
            self.class_sum[k] = self.class_sum.get(k, 0.0) + xs[sel].sum(0)
            self.class_n[k] = self.class_n.get(k, 0) + int(sel.sum())
        if self.rows is not None:
            self.rows.append(xs)
            if self.n > self.d:
                r = np.concatenate(self.rows)
                self.rows, self.gram = None, r.T @ r
        else:
            self.gram += xs.T @ xs

    @property
    def nbytes(self) -> int:
        held = self.gram.nbytes if self.gram is not None else sum(r.nbytes for r in self.rows or [])
        return held + self.d * 8 * (len(self.class_sum) + 2)

    def factors(self, rho: float) -> tuple[np.ndarray, np.ndarray, float]:
        """(F, M, ridge) with centred total scatter S = F^T F and between-class scatter S_B = M^T M."""
        mu = self.total / max(self.n, 1)
        if self.rows is not None:
            f = np.concatenate(self.rows) - mu if self.rows else np.zeros((0, self.d))
            trace = float(np.sum(f * f))
        else:
            s = self.gram - self.n * np.outer(mu, mu)
            s = (s + s.T) / 2
            trace = float(np.trace(s))
            w, v = np.linalg.eigh(s)
            pos = w > 0
            f = (v[:, pos] * np.sqrt(w[pos])).T
        ks = sorted(self.class_sum)
        m = np.stack([np.sqrt(self.class_n[k]) * (self.class_sum[k] / self.class_n[k] - mu) for k in ks]) \
            if ks else np.zeros((0, self.d))
        return f, m, self.ridge_scale * _ridge_of_trace(trace, self.d, rho)


def stats_from_features(features: Features, labels: np.ndarray) -> dict[str, FeatureStats]:
    out = {}
    for t, feat in features.items():
        st = FeatureStats(feat.shape[1], feat.shape[2])
        st.add(feat, labels)
        out[t] = st
    return out


# -- one feature map's DI state ----------------------------------------------------------------------
class _Map:
    """DI state of one feature map over its kept dims, in sample space (see the module docstring)."""

    def __init__(self, f: np.ndarray, m: np.ndarray, ridge: float, q: int, roots: np.ndarray,
                 prunable: dict[int, int]) -> None:
        self.rho = ridge
        self.dims_of: dict[int, np.ndarray] = {}
        for c in np.unique(roots).tolist():
            if c in prunable:
                pos = np.nonzero(roots == c)[0]
                self.dims_of[c] = (pos[:, None] * q + np.arange(q)).ravel()
        self.live = np.ones(f.shape[1], dtype=bool)
        self.f_all, self.m_all = f, m
        self.classes = sorted(self.dims_of)
        self.index = prunable
        self.lossvec = np.zeros(len(prunable))  # relative DI loss by position in space.classes
        self.full = 1.0
        self._build()
        self.full = max(self.current, 1e-12)
        self._losses()

    def _build(self) -> None:
        """Exact state for the live dims: Z, H, the diagonal blocks of A and all losses."""
        keep = np.nonzero(self.live)[0]
        self.col = np.full(len(self.live), -1)
        self.col[keep] = np.arange(len(keep))
        f, m = self.f_all[:, keep], self.m_all[:, keep]
        self.f, self.m = f, m
        kn = f @ f.T
        kn[np.diag_indices_from(kn)] += self.rho
        self.z = np.linalg.solve(kn, f) if len(kn) else np.zeros_like(f)
        self.h = (m - (m @ f.T) @ self.z) / self.rho
        self.current = float(np.sum(self.h * m))
        self.batches: dict[int, list] = {}  # block size -> [classes, column index (n, b), A blocks (n, b, b)]
        by_size: dict[int, list[int]] = {}
        for c in self.classes:
            by_size.setdefault(len(self.dims_of[c]), []).append(c)
        for b, cls in by_size.items():
            idx = np.stack([self.col[self.dims_of[c]] for c in cls])
            fi, zi = f[:, idx], self.z[:, idx]
            a = (np.eye(b) - np.einsum("rna,rnb->nab", fi, zi)) / self.rho
            self.batches[b] = [cls, np.array([self.index[c] for c in cls], dtype=np.int64), idx, a]

    def _losses(self) -> None:
        for cls, gi, idx, a in self.batches.values():
            if cls:
                g = self.h[:, idx].transpose(1, 2, 0)  # (n, b, K)
                hth = g @ g.transpose(0, 2, 1)
                self.lossvec[gi] = np.einsum("nii->n", np.linalg.solve(a, hth)) / self.full

    @property
    def loss(self) -> dict[int, float]:
        """Relative DI loss of every prunable class still in this map."""
        return {c: float(self.lossvec[self.index[c]]) for c in self.classes}

    def remove(self, c: int) -> None:
        """Drop class c's dims: a rank-|c| downdate of Z, H and the diagonal blocks of A."""
        dc = self.col[self.dims_of[c]]
        b = len(dc)
        cls, gi, idx, a = self.batches[b]
        i = cls.index(c)
        self.batches[b] = [cls[:i] + cls[i + 1:], np.delete(gi, i), np.delete(idx, i, 0), np.delete(a, i, 0)]
        self.classes.remove(c)
        self.current -= self.lossvec[self.index[c]] * self.full
        self.lossvec[self.index[c]] = 0.0
        self.live[self.dims_of[c]] = False
        if self.live.sum() < 0.75 * self.f.shape[1]:  # compact and rebuild exactly
            self._build()
            self._losses()
            return
        r = self.f[:, dc].T @ self.z  # (b, d) = F_c^T Z
        t = np.linalg.inv(np.eye(b) - r[:, dc])
        self.z += self.z[:, dc] @ (t @ r)
        e = -r
        e[np.arange(b), dc] += 1.0
        self.h -= (self.h[:, dc] @ t) @ e
        for cls2, _gi, idx2, a2 in self.batches.values():
            if cls2:
                rj = r[:, idx2]  # (b, n, bs)
                n, bs = idx2.shape
                u = (t @ rj.reshape(b, -1)).reshape(b, n, bs)
                a2 -= (rj.transpose(1, 2, 0) @ u.transpose(1, 0, 2)) / self.rho
        self._losses()


# -- cost model with the exact arithmetic of ChannelSpace.cost_np ------------------------------------
class _Cost:
    """Cost after removing one more class, evaluated term by term like ChannelSpace.cost_np (same
    floating-point operations, so savings and stopping match the reference bit for bit)."""

    def __init__(self, space: ChannelSpace, kind: str) -> None:
        self.terms = [(float(b), tuple(ts)) for b, ts in space.terms[kind]]
        tensors = sorted({t for _, ts in self.terms for t in ts})
        self.length = {t: len(space.roots[t]) for t in tensors}
        self.kept = dict(self.length)
        self.count: dict[int, dict[str, int]] = {}
        for t in tensors:
            u, n = np.unique(space.roots[t], return_counts=True)
            for c, k in zip(u.tolist(), n.tolist()):
                self.count.setdefault(c, {})[t] = k
        self.terms_of: dict[str, list[int]] = {}
        for i, (_, ts) in enumerate(self.terms):
            for t in set(ts):
                self.terms_of.setdefault(t, []).append(i)
        self.vals = [self._term(i, {}) for i in range(len(self.terms))]
        self.total = self._sum(self.vals)

    def _term(self, i: int, less: dict[str, int]) -> float:
        base, ts = self.terms[i]
        f = base
        for t in ts:
            f *= (self.kept[t] - less.get(t, 0)) / self.length[t]
        return f

    @staticmethod
    def _sum(vals: list[float]) -> float:
        total = 0.0
        for v in vals:
            total += v
        return total

    def affected(self, c: int) -> set[int]:
        return {i for t in self.count.get(c, {}) for i in self.terms_of.get(t, ())}

    def after(self, c: int) -> float:
        less = self.count.get(c, {})
        vals = list(self.vals)
        for i in self.affected(c):
            vals[i] = self._term(i, less)
        return self._sum(vals)

    def remove(self, c: int) -> None:
        less = self.count.get(c, {})
        hit = self.affected(c)
        for t, k in less.items():
            self.kept[t] -= k
        for i in hit:
            self.vals[i] = self._term(i, {})
        self.total = self._sum(self.vals)

    def tensors_near(self, c: int) -> set[str]:
        """Tensors whose classes' savings change when c is removed (they share a cost term)."""
        return {t for i in self.affected(c) for t in self.terms[i][1]}


# -- the search -----------------------------------------------------------------------------------------
def _flop_rate() -> float:
    """Measured float64 matmul rate of this machine right now (flop/s), for the time estimate."""
    a = np.random.default_rng(0).standard_normal((256, 512))
    t = time.perf_counter()
    for _ in range(3):
        a.T @ a
    return 3 * 2 * 256 * 512 * 512 / max(time.perf_counter() - t, 1e-6)


def _estimate(maps: dict[str, _Map], stats: dict[str, FeatureStats], target: float, classes: int) -> tuple[int, float]:
    """(removals, seconds) expected: a fraction 1 - sqrt(target) of the classes (costs are mostly
    bilinear in kept channels); per map removal a downdate of ~(4 rows + 2 classes) * |c| * d flops
    at the measured rate, plus ~1 ms of bookkeeping per removal."""
    frac = 1 - np.sqrt(min(max(target, 0.0), 1.0))
    flops = 0.0
    for t, mp in maps.items():
        (r, d), k = mp.f.shape, len(mp.m)
        flops += frac * len(mp.classes) * (4 * r + 2 * k) * stats[t].q * d * 0.85
    removals = int(frac * classes)
    return removals, flops / _flop_rate() + 1e-3 * removals


def di_search(space: ChannelSpace, stats: dict[str, FeatureStats], target: float, kind: str = "macs",
              rho: float = 1e-2, min_keep: int = 1, progress: bool | Say | None = None) -> frozenset[int]:
    """Greedy budgeted structure search on streamed feature statistics: remove the class with least
    relative DI loss per unit of cost saved until cost <= target * original cost.

    BLAS runs single-threaded here: the search is thousands of small products, where BLAS threads
    only add synchronisation (8x the CPU time on a busy 2-core machine, measured)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return _search(space, stats, target, kind, rho, min_keep, _sayer(progress))


def _search(space: ChannelSpace, stats: dict[str, FeatureStats], target: float, kind: str, rho: float,
            min_keep: int, say: Say) -> frozenset[int]:
    prunable = {c: i for i, c in enumerate(space.classes)}
    maps: dict[str, _Map] = {}
    t0 = time.perf_counter()
    for t, st in stats.items():
        if t not in space.roots or not any(int(c) in prunable for c in np.unique(space.roots[t]).tolist()):
            continue  # a map with no prunable channel cannot change any decision
        f, m, ridge = st.factors(rho)
        maps[t] = _Map(f, m, ridge, st.q, space.roots[t], prunable)
    maps_of: dict[int, list[str]] = {}
    for t, mp in maps.items():
        for c in mp.classes:
            maps_of.setdefault(c, []).append(t)
    removals, eta = _estimate(maps, stats, target, len(space.classes))
    say(f"DI search: {len(maps)} feature maps, {len(space.groups)} groups, ~{removals} removals, "
        f"estimated {eta:.0f} s")

    cost = _Cost(space, kind)
    base = cost.total
    groups_of_tensor: dict[str, set[int]] = {}
    for gi, g in enumerate(space.groups):
        for c in g:
            for t in cost.count.get(c, {}):
                groups_of_tensor.setdefault(t, set()).add(gi)
    groups_of_map = {t: {space.group_of[c] for c in mp.classes} for t, mp in maps.items()}
    live = [np.array(sorted(g), dtype=np.int64) for g in space.groups]
    live_pos = [np.array([prunable[c] for c in ids.tolist()], dtype=np.int64) for ids in live]
    gmaps = [maps_of.get(g[0], []) if g else [] for g in space.groups]  # a group's classes share their maps
    key = np.full(len(space.groups), np.inf)
    cand = [-1] * len(space.groups)

    def evaluate(gi: int) -> None:
        key[gi], cand[gi] = np.inf, -1
        ids = live[gi]
        if len(ids) <= min_keep:
            return
        pos = live_pos[gi]
        loss = np.zeros(len(ids))
        for t in gmaps[gi]:
            loss = loss + maps[t].lossvec[pos]
        j = int(np.argmin(loss))  # first minimum: the smallest class id among equal losses
        c = int(ids[j])
        saved = cost.total - cost.after(c)
        if saved > 0:
            key[gi], cand[gi] = max(float(loss[j]), 0.0) / (saved / base), c

    for gi in range(len(space.groups)):
        evaluate(gi)
    removed: list[int] = []
    last = time.perf_counter()
    while cost.total > target * base * (1 + 1e-9):
        gi = int(np.argmin(key))
        if not np.isfinite(key[gi]):
            raise ValueError(f"{kind} target {target} not reachable")
        c = cand[gi]
        removed.append(c)
        keep = live[gi] != c
        live[gi], live_pos[gi] = live[gi][keep], live_pos[gi][keep]
        near = cost.tensors_near(c)
        cost.remove(c)
        dirty = {gi}
        for t in near:
            dirty |= groups_of_tensor.get(t, set())
        for t in maps_of.get(c, ()):
            maps[t].remove(c)
            dirty |= groups_of_map[t]
        for g in sorted(dirty):
            evaluate(g)
        if time.perf_counter() - last > 1.0:
            last = time.perf_counter()
            kept = np.mean([mp.current / mp.full for mp in maps.values()]) if maps else 1.0
            done = (base - cost.total) / max(base * (1 - target), 1e-12)
            el = last - t0
            say(f"DI search: {len(removed)} classes removed, {100 * done:.0f}% of the way to {kind} "
                f"{target:g}, mean DI kept {100 * kept:.1f}%, {el:.0f} s, ~{el / max(done, 1e-3) - el:.0f} s left")
    kept = np.mean([mp.current / mp.full for mp in maps.values()]) if maps else 1.0
    say(f"DI search: done, {len(removed)} classes removed in {time.perf_counter() - t0:.1f} s, "
        f"mean DI kept {100 * kept:.1f}%")
    return frozenset(removed)


def _sayer(progress: bool | Say | None) -> Say:
    if callable(progress):
        return progress
    if progress:
        import sys

        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda _msg: None


def di_greedy_plan(space: ChannelSpace, features: Features, labels: np.ndarray, target: float,
                   kind: str = "macs", rho: float = 1e-2, min_keep: int = 1,
                   progress: bool | Say | None = False) -> frozenset[int]:
    """di_search on in-memory pooled features (N, C, q) per tensor."""
    return di_search(space, stats_from_features(features, np.asarray(labels)), target, kind, rho, min_keep, progress)


def di_scores(space: ChannelSpace, features: Features, labels: np.ndarray, rho: float = 1e-2) -> dict[int, float]:
    """One-shot importance: relative DI loss of each class summed over the maps it lives on."""
    prunable = {c: i for i, c in enumerate(space.classes)}
    scores = {c: 0.0 for c in space.classes}
    for t, st in stats_from_features(features, np.asarray(labels)).items():
        f, m, ridge = st.factors(rho)
        for c, v in _Map(f, m, ridge, st.q, space.roots[t], prunable).loss.items():
            scores[c] += v
    return scores


# -- feature capture ------------------------------------------------------------------------------------
def pool_features(x: np.ndarray | torch.Tensor, axis: int, p: int = 2, samples: int | None = None) -> torch.Tensor:
    """(b, C, q) pooled features of a layer output whose channels lie on `axis`.

    Channels-first maps are average-pooled to p x p (q = p*p), token layouts (b, T, C) or (b, C, T)
    to p*p positions, dense (b, C) features give one dim. A tensor without a batch axis (squeezed
    out of a batch-1 model) counts as one sample.
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    axis = axis % x.ndim if x.ndim else 0
    if axis == 0 or (samples is not None and x.shape[0] != samples):
        if samples not in (None, 1):
            raise ValueError(f"tensor of shape {tuple(x.shape)} has no batch axis of {samples} samples")
        x, axis = x.unsqueeze(0), axis + 1
    x = x.movedim(axis, 1)
    if x.ndim == 2:
        return x.unsqueeze(-1)
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, p).flatten(2)
    return F.adaptive_avg_pool1d(x.flatten(2), p * p)


def _ridge_scale(q: int, p: int) -> float:
    """Dense features get one dim per channel. The original implementation padded each to p*p
    copies of x/p: the same DI as the single dim with the ridge divided by p*p, which is kept."""
    return 1.0 / (p * p) if q == 1 else 1.0


def feature_maps(analysis: Any, prunable: Iterable[int] | None = None) -> list[str]:
    """The layer outputs DI observes: only those carrying at least one prunable channel class
    (frozen maps, e.g. a 6625-class output, can change no decision and are never captured)."""
    names = feature_tensors(analysis)
    if prunable is None:
        return names
    want = set(prunable)
    return [t for t in names if t in analysis.roots and want.intersection(np.unique(analysis.roots[t]).tolist())]


def _bytes_per_sample(analysis: Any, names: list[str]) -> float | None:
    total = 0.0
    for t in names:
        shape = analysis.graph.shape(t) if hasattr(analysis.graph, "shape") else None
        if not shape or any(not isinstance(d, int) or d <= 0 for d in shape[1:]):
            return None
        total += 4.0 * float(np.prod(shape[1:]))
    return total


class _Collector:
    """Pools each captured batch and folds it into per-tensor FeatureStats (or keeps the pooled rows)."""

    def __init__(self, analysis: Any, names: list[str], pool: int, keep_rows: bool = False) -> None:
        self.axes = {t: channel_axis(analysis, t) for t in names}
        self.pool = pool
        self.stats: dict[str, FeatureStats] = {}
        self.rows: dict[str, list[np.ndarray]] = {t: [] for t in names} if keep_rows else {}
        self.keep_rows = keep_rows

    def add(self, t: str, value: Any, labels: np.ndarray) -> None:
        feat = pool_features(value, self.axes[t], self.pool, len(labels)).double().numpy()
        if self.keep_rows:
            self.rows[t].append(feat)
            return
        st = self.stats.get(t)
        if st is None:
            st = self.stats[t] = FeatureStats(feat.shape[1], feat.shape[2], _ridge_scale(feat.shape[2], self.pool))
        st.add(feat, labels)


def onnx_feature_stats(model: Any, analysis: Any, inputs: np.ndarray | dict[str, np.ndarray], labels: np.ndarray,
                       prunable: Iterable[int] | None = None, pool: int = 2, batch_size: int | None = None,
                       say: Say | None = None, _keep_rows: bool = False) -> Any:
    """Streamed DI statistics of every prunable layer output of an ONNX model (onnxruntime)."""
    from graphprune.capture import iter_tensors

    names = feature_maps(analysis, prunable)
    col = _Collector(analysis, names, pool, keep_rows=_keep_rows)
    labels = np.asarray(labels)
    done, n = 0, len(labels)
    last = time.perf_counter()
    for real, outs in iter_tensors(model, names, inputs, batch_size=batch_size,
                                   bytes_per_sample=_bytes_per_sample(analysis, names)):
        for t in names:
            col.add(t, outs[t], labels[done: done + real])
        done += real
        if say is not None and time.perf_counter() - last > 1.0:
            last = time.perf_counter()
            say(f"DI: feature statistics {done}/{n} samples")
    if _keep_rows:
        return {t: np.concatenate(v) for t, v in col.rows.items() if v}
    return col.stats


def onnx_features(model: Any, analysis: Any, inputs: np.ndarray | dict[str, np.ndarray], pool: int = 2,
                  batch_size: int | None = None) -> Features:
    """Pooled layer outputs (N, C, q) of an ONNX model kept in memory (small models, tests)."""
    n = len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)
    return onnx_feature_stats(model, analysis, inputs, np.zeros(n, dtype=np.int64), None, pool, batch_size,
                              _keep_rows=True)


@torch.no_grad()
def torch_feature_stats(model: nn.Module, space: ChannelSpace, x: torch.Tensor, labels: np.ndarray,
                        pool: int = 2, batch_size: int = 64, device: str = "cpu",
                        _keep_rows: bool = False) -> Any:
    """Streamed DI statistics of every gate point (layer output after its BN) via forward hooks."""
    modules = dict(model.named_modules())
    names = [g.tensor for g in space.gates]
    col = _Collector(space.analysis, names, pool, keep_rows=_keep_rows)
    labels = np.asarray(labels)
    cur: dict[str, np.ndarray] = {}
    hooks = []
    for g in space.gates:
        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, t: str = g.tensor) -> None:
            col.add(t, out.detach().float().cpu(), cur["y"])
        hooks.append(modules[g.module].register_forward_hook(hook))
    from graphprune.frontends.fx_frontend import eval_mode

    model.to(device)
    try:
        with eval_mode(model):  # not .eval(): modules from torch.export refuse it
            for i, xb in enumerate(x.split(batch_size)):
                cur["y"] = labels[i * batch_size: i * batch_size + len(xb)]
                model(xb.to(device))
    finally:
        for h in hooks:
            h.remove()
    if _keep_rows:
        return {t: np.concatenate(v) for t, v in col.rows.items() if v}
    return col.stats


def torch_features(model: nn.Module, space: ChannelSpace, x: torch.Tensor, pool: int = 2,
                   batch_size: int = 256, device: str = "cpu") -> Features:
    """Pooled outputs of every gate point on the calibration inputs, kept in memory."""
    return torch_feature_stats(model, space, x, np.zeros(len(x), dtype=np.int64), pool, batch_size, device,
                               _keep_rows=True)


def di_prune_plan(space: ChannelSpace, features: Features, labels: Iterable[int], target: float,
                  kind: str = "macs", rho: float = 1e-2, progress: bool = False) -> frozenset[int]:
    """Entry point: features + labels + FLOPs (or params) target in, removed class ids out."""
    return di_greedy_plan(space, features, np.asarray(list(labels)), target, kind, rho, progress=progress)
