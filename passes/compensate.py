"""Bias (mean) compensation: fold each removed channel's expected contribution into its consumers' bias.

A removed input channel c of a consumer used to add W[:, c] * a_c to the consumer's pre-activation.
Replacing a_c by its calibration mean E[a_c] keeps that contribution's expectation exactly, and since
it is constant it becomes a bias term:

    conv:   delta[o] = sum_c E[a_c] * sum_t W[o, c, t] * coverage(t)
    dense:  delta    = E[a_removed] @ M[removed, :]

coverage(t) is the fraction of output positions where kernel tap t reads a real input rather than
zero padding (1 for 1x1 kernels), so padded borders are accounted for on average. Grouped and
depthwise convs read channel g*cin_g + i through group g's filters only. ConvTranspose spreads each
input over the taps, so its mean output gains E[a_c] * sum_t W[c, o, t] * (inputs / outputs).
For a channel that is constant on the calibration data (a folded BN bias behind a dead filter, a
learnable affine) the compensated model computes exactly what the original did.

Pure numpy: statistics and weights in, per-consumer bias deltas (over ALL output channels) out.
"""
from __future__ import annotations

import numpy as np

from graphprune.analysis.groups import Analysis
from graphprune.passes.act_importance import ChannelStats
from graphprune.passes.consumers import Consumer, conv_geometry, dense_matrix, tap_coverage


def bias_delta(analysis: Analysis, c: Consumer, mean: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Bias change (float64, one per output channel of `c`) that replaces removed inputs by their mean.

    `mean` is the per-position mean of the consumer's input tensor (all groups).
    """
    w = np.asarray(analysis.graph.constants[c.weight] if weight is None else weight, dtype=np.float64)
    rem = c.removed_in
    if c.kind == "dense":
        m = dense_matrix(w, c.in_axis)
        return mean[rem] @ m[rem, :]
    xs = analysis.graph.shape(c.x)
    ys = analysis.graph.shape(c.y)
    if c.kind == "convT":
        per_tap = w.reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [in, out]
        ratio = float(np.prod(xs[2:])) / max(float(np.prod(ys[2:])), 1.0)
        return (mean[rem] @ per_tap[rem, :]) * ratio
    kernel = tuple(w.shape[2:])
    cover = tap_coverage(conv_geometry(c.attrs, kernel, tuple(xs[2:]), tuple(ys[2:])), kernel,
                         tuple(xs[2:]), tuple(ys[2:]))
    eff = (w * cover).reshape(w.shape[0], w.shape[1], -1).sum(-1)  # [out, in/g]
    g = c.groups
    cout_g, cin_g = w.shape[0] // g, w.shape[1]
    delta = np.zeros(w.shape[0])
    for k in range(g):
        mu = mean[k * cin_g:(k + 1) * cin_g][rem]
        delta[k * cout_g:(k + 1) * cout_g] = eff[k * cout_g:(k + 1) * cout_g][:, rem] @ mu
    return delta


def compensation(analysis: Analysis, cons: list[Consumer], stats: ChannelStats) -> dict[str, np.ndarray]:
    """Consumer node -> bias delta over all its output channels, for every consumer that lost inputs."""
    return {c.node: bias_delta(analysis, c, stats.mean(c.x)) for c in cons if len(c.removed_in)}
