"""Frozen copy of the pre-issue-20 DI search (O(d^3) re-inversion per removed channel).

Kept only as the oracle for tests/test_di_equivalence.py and benchmarks/di_scale.py: the
incremental search in graphprune.passes.di must produce the same plans. Do not optimise this.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphprune.passes.channels import ChannelSpace, feature_tensors

Features = dict[str, np.ndarray]


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
    return rel * max(float(np.trace(s)) / max(len(s), 1), 1e-12)


def discriminant_information(x: np.ndarray, labels: np.ndarray, rho: float = 1e-2) -> float:
    """DI of features x (N, d); rho is relative to the mean variance (scale-free)."""
    s, sb = scatter(x, labels)
    a = np.linalg.inv(s + _ridge(s, rho) * np.eye(len(s)))
    return float(np.sum(a * sb))


def leave_one_out_di(s: np.ndarray, sb: np.ndarray, blocks: list[np.ndarray], ridge: float) -> tuple[float, np.ndarray]:
    """DI with all dims, and DI with each block of dims left out (blocks: index arrays into d).

    With A = (S + ridge I)^-1 and r the kept dims,
        DI_-c = tr(A_rr B_rr) - tr(A_cc^-1 A_cr B_rr A_rc)
    and both terms expand into diagonal blocks of A o B, AB and ABA, so all blocks cost one
    inverse and two d x d products (blocks of one size are done in a batch).
    """
    d = len(s)
    a = np.linalg.inv(s + ridge * np.eye(d))
    ab = a @ sb
    aba = ab @ a
    full = float(np.trace(ab))
    rowsum = np.sum(a * sb, axis=1)
    out = np.empty(len(blocks))
    sizes = {len(c) for c in blocks}
    for q in sizes:
        which = [i for i, c in enumerate(blocks) if len(c) == q]
        idx = np.stack([blocks[i] for i in which])  # (m, q)
        ii, jj = idx[:, :, None], idx[:, None, :]
        a_cc, b_cc, ab_cc, aba_cc = a[ii, jj], sb[ii, jj], ab[ii, jj], aba[ii, jj]
        ba_cc = np.swapaxes(ab_cc, 1, 2)  # B A = (A B)^T for symmetric A, B
        t1 = full - 2 * rowsum[idx].sum(1) + np.sum(a_cc * b_cc, axis=(1, 2))
        x = aba_cc - a_cc @ ba_cc - ab_cc @ a_cc + a_cc @ b_cc @ a_cc
        t2 = np.trace(np.linalg.solve(a_cc, x), axis1=1, axis2=2)
        out[which] = t1 - t2
    return full, out


def channel_di_loss(feat: np.ndarray, labels: np.ndarray, rho: float = 1e-2) -> np.ndarray:
    """DI lost when each channel of feat (N, C, p*p) is removed: the per-layer importance."""
    n, c, q = feat.shape
    s, sb = scatter(feat.reshape(n, c * q), labels)
    blocks = [np.arange(i * q, (i + 1) * q) for i in range(c)]
    full, loo = leave_one_out_di(s, sb, blocks, _ridge(s, rho))
    return full - loo


class _Layer:
    """DI state of one feature map: positions still kept, full DI, current leave-one-out losses."""

    def __init__(self, feat: np.ndarray, labels: np.ndarray, roots: np.ndarray, rho: float) -> None:
        n, c, q = feat.shape
        self.q = q
        self.s, self.sb = scatter(feat.reshape(n, c * q), labels)
        self.ridge = _ridge(self.s, rho)
        self.roots = roots
        self.kept = np.ones(c, dtype=bool)
        self.full = max(discriminant_information_from(self.s, self.sb, self.ridge), 1e-12)
        self.loss: dict[int, float] = {}
        self.refresh()

    def dims(self, keep_pos: np.ndarray) -> np.ndarray:
        return (np.nonzero(keep_pos)[0][:, None] * self.q + np.arange(self.q)).ravel()

    def refresh(self) -> None:
        """Leave-one-out DI loss of every class still present, relative to this map's full DI."""
        dims = self.dims(self.kept)
        s, sb = self.s[np.ix_(dims, dims)], self.sb[np.ix_(dims, dims)]
        classes = np.unique(self.roots[self.kept])
        local = np.full(len(self.kept), -1)
        local[self.kept] = np.arange(self.kept.sum())
        blocks = []
        for c in classes:
            pos = local[(self.roots == c) & self.kept]
            blocks.append((pos[:, None] * self.q + np.arange(self.q)).ravel())
        cur, loo = leave_one_out_di(s, sb, blocks, self.ridge)
        self.loss = {int(c): (cur - v) / self.full for c, v in zip(classes, loo)}

    def remove(self, cls: int) -> None:
        self.kept &= self.roots != cls
        self.refresh()


def discriminant_information_from(s: np.ndarray, sb: np.ndarray, ridge: float) -> float:
    return float(np.sum(np.linalg.inv(s + ridge * np.eye(len(s))) * sb))


def di_scores(space: ChannelSpace, features: Features, labels: np.ndarray, rho: float = 1e-2) -> dict[int, float]:
    """One-shot importance: relative DI loss of each class summed over the maps it lives on."""
    scores = {c: 0.0 for c in space.classes}
    for t, feat in features.items():
        layer = _Layer(feat, labels, space.roots[t], rho)
        for c, v in layer.loss.items():
            if c in scores:
                scores[c] += v
    return scores


def di_greedy_plan(space: ChannelSpace, features: Features, labels: np.ndarray, target: float,
                   kind: str = "macs", rho: float = 1e-2, min_keep: int = 1,
                   progress: bool = False) -> frozenset[int]:
    """Greedy budgeted structure search: remove the class with least relative DI loss per unit of
    cost saved until cost <= target * original cost."""
    layers = {t: _Layer(f, labels, space.roots[t], rho) for t, f in features.items()}
    maps_of: dict[int, list[str]] = {}
    for t, layer in layers.items():
        for c in np.unique(layer.roots).tolist():
            maps_of.setdefault(int(c), []).append(t)
    keep = np.ones(len(space.classes))
    base = space.cost_np(kind, keep)
    cur = base
    left = {gi: len(g) for gi, g in enumerate(space.groups)}
    removed: set[int] = set()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(100 * (1 - target)), desc="DI greedy search", leave=False)
    while cur > target * base * (1 + 1e-9):
        best, best_key, best_cost = None, None, None
        for gi, g in enumerate(space.groups):
            if left[gi] <= min_keep:
                continue
            cands = [c for c in g if c not in removed]
            loss = {c: sum(layers[t].loss.get(c, 0.0) for t in maps_of.get(c, ())) for c in cands}
            c = min(cands, key=lambda k: (loss[k], k))
            keep[space.index[c]] = 0.0
            after = space.cost_np(kind, keep)
            keep[space.index[c]] = 1.0
            saved = cur - after
            if saved <= 0:
                continue
            key = max(loss[c], 0.0) / (saved / base)
            if best_key is None or key < best_key:
                best, best_key, best_cost = c, key, after
        if best is None:
            raise ValueError(f"{kind} target {target} not reachable")
        removed.add(best)
        keep[space.index[best]] = 0.0
        left[space.group_of[best]] -= 1
        if bar is not None:
            bar.n = round(100 * (1 - best_cost / base))
            bar.refresh()
        cur = best_cost
        for t in maps_of.get(best, ()):
            layers[t].remove(best)
    if bar is not None:
        bar.close()
    return frozenset(removed)


def _pool(x: torch.Tensor, p: int) -> torch.Tensor:
    if x.ndim == 4:
        x = F.adaptive_avg_pool2d(x, p).flatten(2)
    elif x.ndim == 2:
        x = x.unsqueeze(-1).expand(-1, -1, p * p) / p  # dense features: one dim, padded to the block size
    else:
        x = x.flatten(2).mean(-1, keepdim=True).expand(-1, -1, p * p)
    return x


def onnx_features(model: Any, analysis: Any, inputs: np.ndarray | dict[str, np.ndarray], pool: int = 2,
                  batch_size: int = 256) -> Features:
    """Pooled layer outputs of an ONNX model via onnxruntime (the layer outputs become graph outputs)."""
    import onnx
    import onnxruntime as ort

    from graphprune.frontends.onnx_frontend import load_onnx

    proto = load_onnx(model).proto if not isinstance(model, onnx.ModelProto) else model
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    names = feature_tensors(analysis)
    have = {o.name for o in proto.graph.output}
    for t in names:
        if t not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    feed_all = inputs if isinstance(inputs, dict) else {in_name: inputs}
    n = len(next(iter(feed_all.values())))
    store: dict[str, list[torch.Tensor]] = {t: [] for t in names}
    for i in range(0, n, batch_size):
        feed = {k: np.ascontiguousarray(v[i: i + batch_size]) for k, v in feed_all.items()}
        outs = sess.run(names, feed)
        for t, o in zip(names, outs):
            store[t].append(_pool(torch.from_numpy(np.asarray(o, dtype=np.float32)), pool))
    return {t: torch.cat(v).double().numpy() for t, v in store.items()}
