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


def _out_spatial(in_spatial: tuple[int, ...], kernel: tuple[int, ...], geom: ConvGeometry) -> tuple[int, ...]:
    return tuple((in_spatial[d] + geom.pads_begin[d] + geom.pads_end[d] - geom.dilations[d] * (kernel[d] - 1) - 1)
                 // geom.strides[d] + 1 for d in range(len(kernel)))


def patch_rows(x: np.ndarray, kernel: tuple[int, ...], geom: ConvGeometry, pick: np.ndarray | None) -> np.ndarray:
    """im2col rows of a 1-D/2-D conv input at chosen output positions only.

    x (N, C, *S); pick (N, R) flat output positions (None: all). Returns (N, R, C*prod(kernel)) with
    columns ordered like W.reshape(out, -1), i.e. channel-major, then kernel taps. Zero padding reads 0.
    """
    if x.ndim == 3:  # 1-D conv: a 2-D one with unit height
        x = x[:, :, None, :]
        kernel = (1, *kernel)
        geom = ConvGeometry((1, *geom.strides), (1, *geom.dilations), (0, *geom.pads_begin), (0, *geom.pads_end))
    n, c, h, w = x.shape
    ho, wo = _out_spatial((h, w), kernel, geom)
    if pick is None:
        pick = np.broadcast_to(np.arange(ho * wo), (n, ho * wo))
    oh, ow = pick // wo, pick % wo  # (N, R)
    pb, pe = geom.pads_begin, geom.pads_end
    if kernel == (1, 1) and not any(pb) and not any(pe):
        ih, iw = oh * geom.strides[0], ow * geom.strides[1]
        rows = x[np.arange(n)[:, None], :, ih, iw]  # (N, R, C)
        return rows
    xp = np.pad(x, ((0, 0), (0, 0), (pb[0], pe[0]), (pb[1], pe[1]))) if any(pb) or any(pe) else x
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            ih = oh * geom.strides[0] + i * geom.dilations[0]
            iw = ow * geom.strides[1] + j * geom.dilations[1]
            taps.append(xp[np.arange(n)[:, None], :, ih, iw])  # (N, R, C)
    return np.stack(taps, axis=-1).reshape(n, pick.shape[1], -1)  # (N, R, C, K) -> (N, R, C*K)


def _mirror(g: np.ndarray, to_lower: bool, block: int = 256) -> None:
    """Copy one triangle of the square `g` onto the other in place, a block of rows at a time."""
    n = len(g)
    for i in range(0, n, block):
        j = min(i + block, n)
        sq = g[i:j, i:j]
        below = np.tril_indices(j - i, -1)
        if to_lower:
            g[j:, i:j] = g[i:j, j:].T
            sq[below] = sq.T[below]
        else:
            g[i:j, j:] = g[j:, i:j].T
            sq.T[below] = sq[below]


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
        # Fortran order: BLAS syrk updates it in place, so a batch adds no D x D temporary
        self.gram = [np.zeros((di, di), order="F") for di in d]
        self.xty = [np.zeros((di, len(o))) for di, o in zip(d, self.outs)]
        self.yy = [np.zeros(len(o)) for o in self.outs]
        self.rows = 0

    # -- accumulation ------------------------------------------------------------------------------
    def _positions(self, x: np.ndarray) -> int:
        if self.c.kind == "conv":
            spatial = x.shape[2:] if x.ndim == 4 else (1, x.shape[2])
            kernel = tuple(self.w.shape[2:]) if x.ndim == 4 else (1, self.w.shape[2])
            g = self.geom if x.ndim == 4 else ConvGeometry(
                (1, *self.geom.strides), (1, *self.geom.dilations), (0, *self.geom.pads_begin), (0, *self.geom.pads_end))
            return int(np.prod(_out_spatial(tuple(spatial), kernel, g)))
        return int(np.prod(np.delete(np.array(x.shape[1:]), self.c.feature_axis % x.ndim - 1)))

    def _rows(self, x: np.ndarray, pick: np.ndarray | None) -> np.ndarray:
        """(N, R, D) rows: conv patches, or dense features (feature axis last) at the picked positions."""
        if self.c.kind == "conv":
            return patch_rows(x, tuple(self.w.shape[2:]), self.geom, pick)
        a = np.moveaxis(x, self.c.feature_axis % x.ndim, -1)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        return a if pick is None else np.take_along_axis(a, pick[:, :, None], 1)

    def add(self, x_pruned: np.ndarray, x_orig: np.ndarray, first_sample: int) -> None:
        """Accumulate one batch: the pruned model's input (kept channels) and the original's (all)."""
        n = x_pruned.shape[0]
        L = self._positions(x_pruned)
        pick = None
        if L > self.rows_per_sample:
            # a fixed subset per (sample index, position count): any path feeding the same samples fits the same system
            pick = np.stack([np.sort(np.random.default_rng((self.seed, first_sample + i, L)).choice(
                L, self.rows_per_sample, replace=False)) for i in range(n)])
        rp = self._rows(x_pruned, pick).astype(np.float64)
        ro = self._rows(x_orig, pick).astype(np.float64)
        rp = rp.reshape(-1, rp.shape[-1])
        ro = ro.reshape(-1, ro.shape[-1])
        g = self.groups
        cin_kept = len(self.kin) * self.k
        cin_full = ro.shape[1] // g
        from scipy.linalg.blas import dsyrk

        a = np.empty((rp.shape[0], cin_kept + 1))  # [x, 1]: the bias column rides along in every product
        a[:, cin_kept] = 1.0
        for k in range(g):
            a[:, :cin_kept] = rp[:, k * cin_kept:(k + 1) * cin_kept]
            y = ro[:, k * cin_full:(k + 1) * cin_full] @ self.w_full[k].T + self.b[self.outs[k]]
            # upper triangle of [x, 1]^T [x, 1] accumulated in place (a.T is Fortran-contiguous: no copy)
            dsyrk(1.0, a.T, beta=1.0, c=self.gram[k], trans=0, lower=0, overwrite_c=1)
            self.xty[k] += a.T @ y
            self.yy[k] += np.einsum("ij,ij->j", y, y)
        self.rows += rp.shape[0]

    # -- solution ----------------------------------------------------------------------------------
    def _theta0(self, k: int) -> np.ndarray:
        return np.vstack([self.w_kept[k].T, self.b[self.outs[k]][None, :]])

    def _sq_error(self, k: int, theta: np.ndarray, g_theta: np.ndarray) -> float:
        """||[x, 1] theta - y||^2 from the sums, given g_theta = G theta."""
        return float(np.sum(self.yy[k]) - 2 * np.sum(theta * self.xty[k]) + np.sum(theta * g_theta))

    def solve(self) -> FitResult:
        """Ridge solution per group, factorised in place in the accumulated Gram matrix.

        The Gram matrix is the one object of size D^2 (a dense layer fed by 2048 channels: 34 MB), so
        no copy of it is made: G is mirrored into the lower triangle, the Cholesky factor of G + R
        overwrites the upper one, and afterwards the diagonal and the upper triangle are restored.
        """
        from scipy.linalg.blas import dsymm
        from scipy.linalg.lapack import dpotrf, dpotrs

        thetas, before, after, total = [], 0.0, 0.0, 0.0
        for k in range(self.groups):
            g, h = self.gram[k], self.xty[k]
            t0 = self._theta0(k)
            d = len(g) - 1
            diag = g.diagonal().copy()
            lam = self.ridge * max(float(diag[:d].sum()) / max(d, 1), 1e-12)
            reg = np.full(d + 1, lam)
            reg[d] = 0.0
            rhs = h + reg[:, None] * t0
            _mirror(g, to_lower=True)
            g[np.diag_indices(d + 1)] += reg
            factor, info = dpotrf(g, lower=0, clean=0, overwrite_a=1)  # g is Fortran-ordered: no copy
            if info == 0:
                theta, info = dpotrs(factor, rhs, lower=0)
            g[np.diag_indices(d + 1)] = diag  # lower triangle and diagonal: G again
            if info != 0:  # not positive definite in floating point: least squares on G + R
                full = np.tril(g) + np.tril(g, -1).T + np.diag(reg)
                theta = np.linalg.lstsq(full, rhs, rcond=None)[0]
                del full
            thetas.append(theta)
            before += max(self._sq_error(k, t0, dsymm(1.0, g, t0, side=0, lower=1)), 0.0)
            after += max(self._sq_error(k, theta, dsymm(1.0, g, theta, side=0, lower=1)), 0.0)
            _mirror(g, to_lower=False)
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
