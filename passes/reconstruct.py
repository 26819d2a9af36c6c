"""Layer-wise least-squares reconstruction of the consumers of removed channels.

For a consumer with original weights W, bias b and original input x_o, the pruned model feeds it its
own input x_p (kept channels only, computed by the already reconstructed layers before it). The kept
weights and the bias are re-fitted so that the pruned layer reproduces the ORIGINAL output:

    min_theta  || [P(x_p), 1] theta - (P(x_o) W^T + b) ||^2 + lambda || theta - theta_0 ||^2

P(.) are im2col patches for a conv (one row per output position and sample; per group for grouped
convs) and the feature rows for a dense layer. theta_0 are the kept original weights and bias, so the
ridge term shrinks towards "plain pruning" rather than towards zero when the data do not pin a
direction down; lambda is relative to the mean diagonal of the Gram matrix (scale-free) and the
bias column is not penalised. Sums are streamed: X^T X, X^T Y and ||Y||^2 are accumulated in float64
sample by sample, so memory is O(D^2) per layer whatever the calibration size; at most
`rows_per_sample` output positions per sample are used (a fixed pseudo-random subset per sample
index, so every path that feeds the same samples in the same order fits the same system).

The same sums give the layer's relative output error ||Y_hat - Y|| / ||Y|| before (kept weights,
unchanged bias) and after the fit, with no extra pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.passes.consumers import Consumer, ConvGeometry, dense_matrix


def supports(c: Consumer, weight_ndim: int) -> bool:
    """LSQ handles dense layers and 1-D/2-D convs; other consumers keep bias compensation only."""
    return c.kind == "dense" or (c.kind == "conv" and weight_ndim in (3, 4))


def _unfold(x: np.ndarray, kernel: tuple[int, ...], geom: ConvGeometry) -> np.ndarray:
    """im2col: (N, C, *S) -> (N, L, C*prod(kernel)) with columns ordered like W.reshape(out, -1)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    if t.ndim == 3:  # 1-D conv as a 2-D one with a unit height
        t = t.unsqueeze(2)
        kernel = (1, *kernel)
        geom = ConvGeometry((1, *geom.strides), (1, *geom.dilations), (0, *geom.pads_begin), (0, *geom.pads_end))
    pad = (geom.pads_begin[1], geom.pads_end[1], geom.pads_begin[0], geom.pads_end[0])
    if any(pad):
        t = F.pad(t, pad)
    cols = F.unfold(t, kernel, dilation=geom.dilations, stride=geom.strides)  # (N, C*K, L)
    return cols.transpose(1, 2).numpy()


@dataclass
class FitResult:
    weight: np.ndarray  # pruned layout: conv [kept out, kept in/g, *k]; dense as stored (M or M^T)
    bias: np.ndarray  # [kept out]
    err_before: float
    err_after: float
    rows: int


class LayerFit:
    """Streaming least-squares fit of one consumer (see module docstring)."""

    def __init__(self, c: Consumer, weight: np.ndarray, bias: np.ndarray | None, geom: ConvGeometry | None = None,
                 *, ridge: float = 1e-3, rows_per_sample: int = 256, seed: int = 0) -> None:
        self.c = c
        self.w = np.asarray(weight, dtype=np.float64)
        n_out = self.w.shape[0] if c.kind == "conv" else dense_matrix(self.w, c.in_axis).shape[1]
        self.b = np.zeros(n_out) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        self.geom = geom
        self.ridge = ridge
        self.rows_per_sample = rows_per_sample
        self.seed = seed
        self.groups = c.groups if c.kind == "conv" else 1
        self.kin = np.nonzero(c.keep_in)[0]
        g = self.groups
        if c.kind == "conv":
            cout_g = self.w.shape[0] // g
            self.k = int(np.prod(self.w.shape[2:]))
            # per group: kept output channel indices (global) and the original matrix [out_g, in_g*K]
            self.outs = [k * cout_g + np.nonzero(c.keep_out[k * cout_g:(k + 1) * cout_g])[0] for k in range(g)]
            wm = self.w.reshape(self.w.shape[0], self.w.shape[1], self.k)
            self.w_full = [wm[o].reshape(len(o), -1) for o in self.outs]  # original, all inputs of the group
            self.w_kept = [wm[o][:, self.kin].reshape(len(o), -1) for o in self.outs]
        else:
            m = dense_matrix(self.w, c.in_axis)  # [in, out]
            self.k = 1
            self.outs = [np.nonzero(c.keep_out)[0]]
            self.w_full = [m[:, self.outs[0]].T]
            self.w_kept = [m[self.kin][:, self.outs[0]].T]
        d = [len(self.kin) * self.k + 1] * g
        self.gram = [np.zeros((di, di)) for di in d]
        self.xty = [np.zeros((di, len(o))) for di, o in zip(d, self.outs)]
        self.yy = [np.zeros(len(o)) for o in self.outs]
        self.rows = 0

    # -- accumulation ------------------------------------------------------------------------------
    def _rows(self, x: np.ndarray, conv_full: bool) -> np.ndarray:
        """(N, L, D) rows for conv (patches), (N, L, F) for dense (feature axis last)."""
        if self.c.kind == "conv":
            return _unfold(x, tuple(self.w.shape[2:]), self.geom)
        a = np.moveaxis(np.asarray(x, dtype=np.float64), self.c.feature_axis % x.ndim, -1)
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def add(self, x_pruned: np.ndarray, x_orig: np.ndarray, first_sample: int) -> None:
        """Accumulate one batch: the pruned model's input (kept channels) and the original's (all)."""
        rp, ro = self._rows(x_pruned, False), self._rows(x_orig, True)
        n, L = rp.shape[0], rp.shape[1]
        if L > self.rows_per_sample:
            pick = np.stack([np.sort(np.random.default_rng((self.seed, first_sample + i)).choice(
                L, self.rows_per_sample, replace=False)) for i in range(n)])
            rp = np.take_along_axis(rp, pick[:, :, None], 1)
            ro = np.take_along_axis(ro, pick[:, :, None], 1)
        rp = rp.reshape(-1, rp.shape[-1])
        ro = ro.reshape(-1, ro.shape[-1])
        g = self.groups
        cin_kept = len(self.kin) * self.k
        cin_full = ro.shape[1] // g
        ones = np.ones((rp.shape[0], 1))
        for k in range(g):
            a = np.hstack([rp[:, k * cin_kept:(k + 1) * cin_kept], ones])
            y = ro[:, k * cin_full:(k + 1) * cin_full] @ self.w_full[k].T + self.b[self.outs[k]]
            self.gram[k] += a.T @ a
            self.xty[k] += a.T @ y
            self.yy[k] += np.einsum("ij,ij->j", y, y)
        self.rows += rp.shape[0]

    # -- solution ----------------------------------------------------------------------------------
    def _theta0(self, k: int) -> np.ndarray:
        return np.vstack([self.w_kept[k].T, self.b[self.outs[k]][None, :]])

    def _sq_error(self, k: int, theta: np.ndarray) -> float:
        g, h = self.gram[k], self.xty[k]
        return float(np.sum(self.yy[k]) - 2 * np.sum(theta * h) + np.sum(theta * (g @ theta)))

    def solve(self) -> FitResult:
        import scipy.linalg

        thetas, before, after, total = [], 0.0, 0.0, 0.0
        for k in range(self.groups):
            g, h = self.gram[k], self.xty[k]
            t0 = self._theta0(k)
            d = len(g) - 1
            lam = self.ridge * max(float(np.trace(g[:d, :d])) / max(d, 1), 1e-12)
            reg = np.full(d + 1, lam)
            reg[d] = 0.0
            try:
                theta = scipy.linalg.solve(g + np.diag(reg), h + reg[:, None] * t0, assume_a="pos")
            except (np.linalg.LinAlgError, ValueError):
                theta = np.linalg.lstsq(g + np.diag(reg), h + reg[:, None] * t0, rcond=None)[0]
            thetas.append(theta)
            before += max(self._sq_error(k, t0), 0.0)
            after += max(self._sq_error(k, theta), 0.0)
            total += float(np.sum(self.yy[k]))
        denom = max(total, 1e-300)
        bias = np.concatenate([t[-1] for t in thetas])
        if self.c.kind == "conv":
            shape = self.w.shape
            w = np.concatenate([t[:-1].T for t in thetas]).reshape(len(bias), len(self.kin), *shape[2:])
        else:
            m = thetas[0][:-1]  # [kept in, kept out]
            w = m if self.c.in_axis == 0 else m.T
        return FitResult(w, bias, float(np.sqrt(before / denom)), float(np.sqrt(after / denom)), self.rows)
