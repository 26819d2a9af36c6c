"""The layers that read pruned channels, described once for the data-aware passes.

A *consumer* is an op with an "in" binding (its weight's input axis indexed by a channel space):
Conv, ConvTranspose, Gemm, MatMul, torch Linear. Removing channels from a class zeroes some of its
input columns; those are exactly the places where importance is felt, a mean can be compensated and
weights can be re-fitted. Residual adds, concats and flatten are already resolved by the rule
table: the binding's tensor is the consumer's own input, and the class roots along it say which of
its input positions go.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.analysis.groups import Analysis


@dataclass
class Consumer:
    """One weighted op reading a channel space.

    kind: "conv" (N-d Conv, weight [out, in/g, *k]), "convT" (ConvTranspose, weight [in, out/g, *k])
    or "dense" (y = x @ M + b over the feature axis, M stored as `weight` possibly transposed).
    keep_in / keep_out: boolean masks over the weight's input axis (one group's worth for grouped
    convs) and over the output channels.
    """

    node: str
    op_type: str
    kind: str
    x: str
    y: str
    weight: str
    bias: str | None
    in_axis: int
    groups: int
    attrs: dict
    keep_in: np.ndarray
    keep_out: np.ndarray
    feature_axis: int = 1

    @property
    def removed_in(self) -> np.ndarray:
        return np.nonzero(~self.keep_in)[0]


def _bias_of(analysis: Analysis, node, kind: str) -> str | None:
    consts = analysis.graph.constants
    if node.op_type in ("Conv", "ConvTranspose", "Linear") and len(node.inputs) > 2 and node.inputs[2]:
        return node.inputs[2] if node.inputs[2] in consts else None
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2]:
        c = consts.get(node.inputs[2])
        w = consts[node.inputs[1]]
        n = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
        if c is not None and c.ndim >= 1 and c.shape[-1] == n and c.size == n:
            return node.inputs[2]
    return None


def consumers(analysis: Analysis, removed: frozenset[int] | set[int] = frozenset(),
              only_affected: bool = True) -> list[Consumer]:
    """Consumers in topological order; with only_affected, those that lose at least one input."""
    masks = analysis.keep_masks(removed)
    order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    out: list[Consumer] = []
    for b in analysis.bindings:
        if b.role != "in":
            continue
        node = analysis.graph.node_by_name[b.node]
        m = masks[b.tensor]
        keep_in = m[: len(m) // b.divisor]
        if only_affected and keep_in.all():
            continue
        y = node.outputs[0]
        if node.op_type == "Conv":
            kind, faxis = "conv", 1
        elif node.op_type == "ConvTranspose":
            kind, faxis = "convT", 1
        else:
            kind, faxis = "dense", (1 if node.op_type == "Gemm" else -1)
        ym = masks.get(y)
        if ym is None:
            ym = np.ones(analysis.graph.shape(y)[faxis], dtype=bool)
        out.append(Consumer(
            node=node.name, op_type=node.op_type, kind=kind, x=b.tensor, y=y, weight=b.param,
            bias=_bias_of(analysis, node, kind), in_axis=b.axis, groups=b.divisor if kind != "dense" else 1,
            attrs=dict(node.attrs), keep_in=keep_in.copy(), keep_out=ym.copy(), feature_axis=faxis,
        ))
    out.sort(key=lambda c: order[c.node])
    return out


def channel_axis(analysis: Analysis, tensor: str) -> int:
    """The axis along which `tensor` carries channel positions (as the analysis sees it)."""
    return int(analysis.ctx.spaces[tensor].axis)


def dense_matrix(w: np.ndarray, in_axis: int) -> np.ndarray:
    """The dense weight as M [in, out] whatever its stored orientation (Gemm transB, torch Linear)."""
    return w if in_axis == 0 else w.T


@dataclass
class ConvGeometry:
    """Per spatial dim: stride, dilation, padding before/after (auto_pad resolved)."""

    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]


def conv_geometry(attrs: dict, kernel: tuple[int, ...], in_spatial: tuple[int, ...],
                  out_spatial: tuple[int, ...]) -> ConvGeometry:
    """ONNX Conv attributes (torch modules are described in the same terms by the driver)."""
    nd = len(kernel)
    strides = tuple(int(s) for s in attrs.get("strides") or (1,) * nd)
    dil = tuple(int(d) for d in attrs.get("dilations") or (1,) * nd)
    auto = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            total = max((out_spatial[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - in_spatial[i], 0)
            b = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(b)
            end.append(total - b)
        return ConvGeometry(strides, dil, tuple(begin), tuple(end))
    if auto == "VALID":
        return ConvGeometry(strides, dil, (0,) * nd, (0,) * nd)
    pads = [int(p) for p in attrs.get("pads") or (0,) * (2 * nd)]
    return ConvGeometry(strides, dil, tuple(pads[:nd]), tuple(pads[nd:]))


def tap_coverage(geom: ConvGeometry, kernel: tuple[int, ...], in_spatial: tuple[int, ...],
                 out_spatial: tuple[int, ...]) -> np.ndarray:
    """Fraction of output positions at which each kernel tap reads a real (non-padding) input."""
    frac = np.ones(kernel)
    for d in range(len(kernel)):
        j = np.arange(out_spatial[d])
        f = np.empty(kernel[d])
        for k in range(kernel[d]):
            idx = j * geom.strides[d] - geom.pads_begin[d] + k * geom.dilations[d]
            f[k] = np.mean((idx >= 0) & (idx < in_spatial[d]))
        view = [1] * len(kernel)
        view[d] = kernel[d]
        frac = frac * f.reshape(view)
    return frac
