"""A static time estimate for allocation (strategy "speed"): MACs plus activation traffic.

Measured per-layer latency (passes/latency_cost.py) is what a latency target needs, but it is noisy
and slow; the FLOPs-target default must give the same plan on every run. On real hardware a MAC in
a 1x1 conv over 192 channels and a MAC in a depthwise conv or an SE gate do not cost the same
time: the latter move far more activation bytes per MAC. This estimate counts both, with the
exchange rate (MACs per element moved) fitted from the hardware's measured channel table
(graphprune.backends.channel_table.elem_macs).
"""
from __future__ import annotations

import numpy as np

from graphprune.analysis.groups import Analysis

TIME_PROXY = "time_proxy"


def time_proxy_terms(analysis: Analysis, elem_macs: float, weight_reads: float = 0.0) -> list[tuple[float, tuple[str, ...]]]:
    """A static estimate of time in MAC units, in the same term form as MACs: every MAC term, plus
    2 * elem_macs per element of every activation with a channel axis that some op writes (one write,
    one read: the traffic that a depthwise conv, an activation or an SE multiply costs beyond its
    MACs; tensors whose channels are all frozen only add a constant).

    Deterministic (no timing), so a plan built on it is the same on every run; elem_macs comes
    from the hardware's measured channel table (channel_table.elem_macs).

    `weight_reads` (default 0: not counted) adds that many element reads per weight per inference, a
    candidate for layers at low resolution, where a GEMM reads each weight for few rows (ConvNeXt's
    last stage). Not the default: on the GPU machine (benchmarks/results/rule_sweep_s5.json, variant
    speed_w1) it was faster on onnxruntime CPU but slower on the GPU for 6 of 7 models, and it moves
    most of the pruning into the last stage, whose effect on accuracy is unmeasured.
    """
    g = analysis.graph
    terms: list[tuple[float, tuple[str, ...]]] = [(m.base, m.tensors) for m in analysis.mac_terms]
    for node in g.nodes:
        if node.name in g.folded_nodes:
            continue
        for t in node.outputs:
            shape = g.shape(t) if t in analysis.roots else None
            if shape is not None:
                terms.append((2.0 * elem_macs * float(np.prod(shape)), (t,)))
    if weight_reads:
        terms += [(weight_reads * elem_macs * base, tensors) for base, tensors in analysis.cost_terms("params")]
    return terms


def register_time_proxy(analysis: Analysis, elem_macs: float, weight_reads: float = 0.0) -> str:
    """Register time_proxy_terms on `analysis` (cost kind TIME_PROXY) and return the kind."""
    analysis.extra_costs[TIME_PROXY] = time_proxy_terms(analysis, elem_macs, weight_reads)
    return TIME_PROXY
