"""Latency-aware cost model: per-layer latency measured on the backend, in the same term form as MACs.

Each weighted op (Conv, ConvTranspose, Gemm, MatMul with a weight) is rebuilt as a one-node ONNX
model at several channel fractions and timed with onnxruntime; a fit t = a + b * (kept-in *
kept-out fraction) per layer turns it into cost terms (b scaled by the kept fractions, a fixed).
Layer times are then scaled so they sum to the measured whole-model latency, which assumes the
ops between them (activations, adds, pooling) shrink with the channels around them.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.analysis.groups import Analysis
from graphprune.backends.ort_backend import sample_ort
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import LoadedModel
from graphprune.ir.graph import Node

FRACTIONS = (1.0, 0.625, 0.25)
TOLERANCE = 0.03  # a measured latency ratio within 3% (relative) of the target meets it


def meets_latency_target(measured: float, target: float, tolerance: float = TOLERANCE) -> bool:
    """A measured latency ratio meets its target when it is at most target * (1 + tolerance)."""
    return measured <= target * (1 + tolerance)


@dataclass
class LayerLatency:
    node: str
    fixed_ms: float
    scaled_ms: float
    tensors: tuple[str, ...]


def time_model(model: onnx.ModelProto, feed: dict[str, np.ndarray], runs: int = 10, threads: int = 1) -> float:
    """Median milliseconds of `runs` onnxruntime runs after warm-up (thread CPU time with one thread)."""
    return statistics.median(sample_ort(model, feed, runs, warmup=2, intra_op_threads=threads, clock="auto"))


def _single_op(analysis: Analysis, node: Node, fin: float, fout: float) -> tuple[onnx.ModelProto, dict] | None:
    """The op alone, with its input channels scaled by fin and output channels by fout."""
    g = analysis.graph
    x, w = node.inputs[0], node.inputs[1]
    xshape, W = g.shape(x), g.constants.get(w)
    if xshape is None or W is None:
        return None
    rng = np.random.default_rng(0)
    attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, np.ndarray)}
    if node.op_type == "Conv":
        group = int(attrs.get("group", 1))
        cin, cout = xshape[1], W.shape[0]
        if group > 1 and W.shape[1] == 1:  # depthwise: in and out shrink together
            ncin = max(1, round(cin * fout))
            group, ncout = ncin, max(1, round(cout * fout))
            ncout -= ncout % ncin if ncout >= ncin else 0
            ncout = max(ncout, ncin)
        else:
            ncin = max(group, round(cin * fin / group) * group)
            ncout = max(group, round(cout * fout / group) * group)
        attrs["group"] = group
        wshape = (ncout, ncin // group, *W.shape[2:])
        xs = (xshape[0], ncin, *xshape[2:])
    elif node.op_type == "ConvTranspose":
        cin, cout = W.shape[0], W.shape[1]
        ncin, ncout = max(1, round(cin * fin)), max(1, round(cout * fout))
        wshape = (ncin, ncout, *W.shape[2:])
        xs = (xshape[0], ncin, *xshape[2:])
    elif node.op_type in ("Gemm", "MatMul"):
        trans_b = int(attrs.get("transB", 0)) if node.op_type == "Gemm" else 0
        k, n = (W.shape[1], W.shape[0]) if trans_b else (W.shape[0], W.shape[1])
        nk, nn = max(1, round(k * fin)), max(1, round(n * fout))
        wshape = (nn, nk) if trans_b else (nk, nn)
        xs = (*xshape[:-1], nk)
    else:
        return None
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xs))]
    inits = [numpy_helper.from_array(rng.standard_normal(wshape).astype(np.float32), "w")]
    node_inputs = ["x", "w"]
    op = helper.make_node(node.op_type, node_inputs, ["y"], **attrs)
    graph = helper.make_graph([op], "probe", inputs, [helper.make_empty_tensor_value_info("y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"x": rng.standard_normal(xs).astype(np.float32)}


def layer_latency_table(analysis: Analysis, runs: int = 8, threads: int = 1,
                        progress: Callable[[str], None] | None = None) -> list[LayerLatency]:
    """Measure and fit every weighted op that the MAC model knows about.

    All probes (every layer at every width) are timed in interleaved rounds and their medians
    taken, so a burst of machine noise shifts every layer alike instead of reordering them: the
    plan built on the table is then stable from run to run.
    """
    from graphprune.backends.ort_backend import interleaved_samples

    by_name = analysis.graph.node_by_name
    terms = analysis.mac_terms
    probes: list[tuple[int, float, onnx.ModelProto, dict]] = []  # (term index, kept product, model, feed)
    for i, term in enumerate(terms):
        node = by_name[term.node]
        in_t = node.inputs[0] in term.tensors
        out_t = node.outputs[0] in term.tensors
        for f in FRACTIONS:
            built = _single_op(analysis, node, f if in_t else 1.0, f)
            if built is None:
                break
            probes.append((i, (f if in_t else 1.0) * (f if out_t else 1.0), built[0], built[1]))
    medians: dict[int, list[tuple[float, float]]] = {}
    if probes:
        if progress:
            progress(f"measuring layer latency ({len(terms)} layers, {len(probes)} probes, interleaved)")
        try:
            samples = interleaved_samples([p[2] for p in probes], [p[3] for p in probes], rounds=runs,
                                          warmup=2, intra_op_threads=threads, clock="auto")
        except Exception:  # a probe onnxruntime cannot run: time the probes one by one instead
            samples = []
            for _, _, model, feed in probes:
                try:
                    samples.append(sample_ort(model, feed, runs, warmup=2, intra_op_threads=threads, clock="auto"))
                except Exception:
                    samples.append([])
        for (i, x, _, _), s in zip(probes, samples):
            if s:
                medians.setdefault(i, []).append((x, statistics.median(s)))
    rows = []
    for i, term in enumerate(terms):
        pts = medians.get(i, [])
        if len(pts) < 2:
            rows.append(LayerLatency(term.node, 0.0, 0.0, term.tensors))
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        b, a = np.polyfit(xs, ys, 1)
        b = max(float(b), 0.0)
        a = max(float(np.mean(ys) - b * np.mean(xs)), 0.0)
        rows.append(LayerLatency(term.node, a, b, term.tensors))
    return rows


def latency_cost_terms(analysis: Analysis, loaded: LoadedModel, runs: int = 8, threads: int = 1,
                       progress: Callable[[str], None] | None = None) -> tuple[list[tuple[float, tuple[str, ...]]], dict]:
    """Cost terms in milliseconds whose full-model sum equals the measured model latency."""
    from graphprune.rewrite.validate import random_feed

    table = layer_latency_table(analysis, runs=runs, threads=threads, progress=progress)
    if progress:
        progress("measuring whole-model latency")
    feed = random_feed(loaded.proto, loaded.graph, seed=0)
    total_ms = time_model(loaded.proto, feed, runs=max(runs, 10), threads=threads)
    layer_sum = sum(r.fixed_ms + r.scaled_ms for r in table)
    scale = total_ms / layer_sum if layer_sum > 0 else 1.0
    terms: list[tuple[float, tuple[str, ...]]] = []
    for r in table:
        if r.scaled_ms > 0:
            terms.append((r.scaled_ms * scale, r.tensors))
        if r.fixed_ms > 0:
            terms.append((r.fixed_ms * scale, ()))
    if not terms or not math.isfinite(total_ms):
        terms = [(total_ms, ())]
    info = {"measured_ms": total_ms, "layers_ms": layer_sum, "scale": scale, "layers": len(table),
            "table": [{"node": r.node, "fixed_ms": r.fixed_ms, "scaled_ms": r.scaled_ms} for r in table]}
    return terms, info


def register_latency_cost(analysis: Analysis, loaded: LoadedModel, runs: int = 8, threads: int = 1,
                            progress: Callable[[str], None] | None = None) -> str:
    """Register the measured latency cost model on `analysis` and return its cost kind."""
    terms, info = latency_cost_terms(analysis, loaded, runs=runs, threads=threads, progress=progress)
    analysis.extra_costs["latency"] = terms
    analysis.latency_info = info  # type: ignore[attr-defined]
    return "latency"


def next_model_target(target: float, tries: list[tuple[float, float]]) -> float:
    """The model target to try next, from (model target, measured ratio) pairs tried so far.

    The measured ratio grows monotonically with the model's target, and (1.0, 1.0) is known without
    measuring (nothing pruned). So this is root finding on a monotone function: interpolate between
    the closest tries below and above the target (regula falsi), and only while nothing measured has
    come out below the target, scale the last try by target / measured. Plain rescaling alone
    oscillates when the per-layer model is far off (a depthwise network measured 0.18 where the model
    said 0.5), which made the plan differ from run to run. Results snap to a 1e-3 grid so that
    measurement noise smaller than that reproduces the same plan.
    """
    points = sorted(set(tries) | {(1.0, 1.0)})
    below = [p for p in points if p[1] < target]
    above = [p for p in points if p[1] >= target]
    if below:
        (t0, m0), (t1, m1) = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
        t = t0 + (target - m0) * (t1 - t0) / (m1 - m0) if m1 > m0 else 0.5 * (t0 + t1)
    else:  # at most halve per step: one measurement spoiled by a busy machine must not empty the model
        t_last, m_last = tries[-1]
        t = t_last * max(0.5, target / max(m_last, 1e-6))
    return min(1.0, max(0.02, round(t, 3)))


def fit_to_measured(target: float, allocate_at: Callable[[float], Any], rewrite: Callable[[Any], onnx.ModelProto],
                    measure: Callable[[onnx.ModelProto], dict], iterations: int = 5,
                    tolerance: float = TOLERANCE) -> tuple[Any, onnx.ModelProto, dict, list[dict]]:
    """Close the loop between the latency model and the clock.

    The per-layer model predicts, the pruned model is measured (interleaved with the original), and
    the next model target comes from next_model_target, until a measured ratio lands within
    `tolerance` (relative) of the target or `iterations` tries are spent. A plan already tried is not
    measured again. Returns the try closest to the target among those not above
    target * (1 + tolerance) (the most capacity within the budget), or the fastest one if none fits,
    with its model, measurement and the history of tries.
    """
    internal = target
    tries: list[tuple[Any, onnx.ModelProto, dict]] = []
    points: list[tuple[float, float]] = []
    history = []
    seen: set[frozenset] = set()
    for _ in range(iterations):
        try:
            plan = allocate_at(internal)
        except GraphpruneError:
            if not tries:
                raise
            break  # the model target fell below what pruning can reach: the tries so far decide
        key = frozenset(plan.removed)
        if key in seen:
            break
        seen.add(key)
        slim = rewrite(plan)
        lat = measure(slim)
        tries.append((plan, slim, lat))
        points.append((internal, lat["ratio"]))
        history.append({"model_target": round(internal, 5), "predicted_ratio": round(plan.achieved, 5),
                        "measured_ratio": round(lat["ratio"], 5)})
        if abs(lat["ratio"] - target) <= tolerance * target:
            break
        internal = next_model_target(target, points)
    fitting = [t for t in tries if meets_latency_target(t[2]["ratio"], target, tolerance)]
    plan, slim, lat = (max(fitting, key=lambda t: t[2]["ratio"]) if fitting
                       else min(tries, key=lambda t: t[2]["ratio"]))
    return plan, slim, lat, history
