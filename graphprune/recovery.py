"""Calibration-driven recovery for pruned ONNX models: statistics, bias compensation, sequential LSQ.

The maths lives in passes (act_importance, compensate, reconstruct); this module executes models.

Sequential reconstruction without re-running the whole model per layer: the original and the pruned
model are cut into segments just before each consumer of removed channels (topological order). For
the LSQ samples the values of the tensors live across the current cut are kept, for both models;
one segment of each model is run to reach the next cut, where the consumer is fitted on the pruned
model's own input and the original model's input (for the target), and its new weights are used by
the next pruned segment. Each model is thus executed once in total, in pieces, and every layer is
fitted on activations that already include the reconstruction of all layers before it. Memory is the
live tensors of a cut times the (capped) number of LSQ samples, independent of the calibration size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.analysis.groups import Analysis
from graphprune.calib import Calibration
from graphprune.capture import _progress, capture_onnx
from graphprune.errors import GraphpruneError
from graphprune.frontends.external import ort_session
from graphprune.frontends.onnx_frontend import tensor_to_array
from graphprune.passes.act_importance import ChannelStats, stat_tensors
from graphprune.passes.compensate import compensation
from graphprune.passes.consumers import Consumer, conv_geometry, consumers
from graphprune.passes.reconstruct import LayerFit, supports

RECOVER_MODES = ("none", "bias", "lsq")


@dataclass
class RecoverOptions:
    """Knobs of the recovery passes (defaults tuned on PP-OCRv4 rec for the 60 s budget, see docs)."""

    mode: str = "lsq"
    ridge: float = 1e-3
    lsq_samples: int = 64
    rows_per_sample: int = 256
    seed: int = 0
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in RECOVER_MODES:
            raise GraphpruneError(f"unknown recover mode {self.mode!r}; choose from {', '.join(RECOVER_MODES)}")
        if self.lsq_samples < 1 or self.rows_per_sample < 1 or self.ridge < 0:
            raise GraphpruneError("lsq_samples and rows_per_sample must be >= 1 and ridge >= 0")


# -- statistics -------------------------------------------------------------------------------------
def collect_stats_onnx(proto: onnx.ModelProto, analysis: Analysis, calib: Calibration,
                       progress: bool | None = None) -> ChannelStats:
    """Per-channel mean and second moment of every consumer input of the ORIGINAL model (one pass)."""
    axes = stat_tensors(analysis)
    stats = ChannelStats(axes)
    if axes:
        capture_onnx(proto, list(axes), calib, stats.update, progress=progress, desc="calibration statistics")
    return stats


# -- editing the pruned proto -----------------------------------------------------------------------
def _init_index(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: i for i, t in enumerate(model.graph.initializer)}


def _find_node(model: onnx.ModelProto, weight: str) -> int:
    for i, n in enumerate(model.graph.node):
        if len(n.input) > 1 and n.input[1] == weight:
            return i
    raise GraphpruneError(f"internal error: no node reads weight '{weight}' in the pruned model")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class OnnxParams:
    """Read/write access to the consumers' weights and biases inside a (pruned) ModelProto.

    Gemm's alpha/beta are folded in and out so the passes see y = x @ M + b. A consumer without a
    bias gets one (Conv/ConvTranspose/Gemm: a new input; MatMul: an Add right after it).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.index = _init_index(model)

    def _get(self, name: str) -> np.ndarray:
        return np.array(tensor_to_array(self.model.graph.initializer[self.index[name]]))

    def _set(self, name: str, value: np.ndarray, dtype: Any) -> None:
        self.model.graph.initializer[self.index[name]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))

    def _add_init(self, name: str, value: np.ndarray) -> None:
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        self.index[name] = len(self.model.graph.initializer) - 1

    def scales(self, c: Consumer) -> tuple[float, float]:
        if c.op_type != "Gemm":
            return 1.0, 1.0
        node = self.model.graph.node[_find_node(self.model, c.weight)]
        return float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))

    def bias_name(self, c: Consumer, n_out: int) -> str:
        """Name of c's bias initializer in this model, creating a zero bias where there is none."""
        i = _find_node(self.model, c.weight)
        node = self.model.graph.node[i]
        dtype = self._get(c.weight).dtype
        if c.op_type in ("Conv", "ConvTranspose", "Gemm", "Linear"):
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] in self.index and self._get(node.input[2]).size == n_out:
                    return node.input[2]
                raise GraphpruneError(f"cannot compensate {c.node}: its bias is not one value per output")
            name = f"{c.weight}__gp_bias"
            self._add_init(name, np.zeros(n_out, dtype=dtype))
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(name)
            if c.op_type == "Gemm":
                for k, a in enumerate(node.attribute):
                    if a.name == "beta":
                        del node.attribute[k]
                        break
            return name
        # MatMul: y = x @ W becomes y = Add(x @ W, b)
        name = f"{c.weight}__gp_bias"
        if name in self.index:
            return name
        self._add_init(name, np.zeros(n_out, dtype=dtype))
        out = node.output[0]
        mid = f"{out}__gp_matmul"
        node.output[0] = mid
        add = helper.make_node("Add", [mid, name], [out], name=f"{node.name or c.node}__gp_bias_add")
        self.model.graph.node.insert(i + 1, add)
        return name

    def add_bias(self, c: Consumer, delta: np.ndarray) -> None:
        _, beta = self.scales(c)
        name = self.bias_name(c, len(delta))
        cur = self._get(name)
        self._set(name, cur.reshape(-1) + delta / beta, cur.dtype)

    def set_fit(self, c: Consumer, weight: np.ndarray, bias: np.ndarray) -> None:
        alpha, beta = self.scales(c)
        name = self.bias_name(c, len(bias))
        cur = self._get(c.weight)
        if weight.shape != cur.shape:
            raise GraphpruneError(f"internal error: fitted weight of {c.node} has shape {weight.shape}, expected {cur.shape}")
        self._set(c.weight, weight / alpha, cur.dtype)
        self._set(name, bias / beta, self._get(name).dtype)


def _effective(analysis: Analysis, c: Consumer) -> tuple[np.ndarray, np.ndarray | None]:
    """Original weight and bias with Gemm's alpha/beta folded in (y = x @ (alpha B) + beta C)."""
    w = np.asarray(analysis.graph.constants[c.weight], dtype=np.float64)
    b = analysis.graph.constants.get(c.bias) if c.bias else None
    b = None if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    if c.op_type == "Gemm":
        node = analysis.graph.node_by_name[c.node]
        w = w * float(node.attrs.get("alpha", 1.0))
        if b is not None:
            b = b * float(node.attrs.get("beta", 1.0))
    return w, b


def new_fit(analysis: Analysis, c: Consumer, opts: RecoverOptions) -> LayerFit:
    """An empty least-squares fit of consumer `c` from its original weights and conv geometry."""
    w, b = _effective(analysis, c)
    geom = None
    if c.kind == "conv":
        xs, ys = analysis.graph.shape(c.x), analysis.graph.shape(c.y)
        geom = conv_geometry(c.attrs, tuple(w.shape[2:]), tuple(xs[2:]), tuple(ys[2:]))
    return LayerFit(c, w, b, geom, ridge=opts.ridge, rows_per_sample=opts.rows_per_sample, seed=opts.seed)


def layer_row(c: Consumer, res: Any) -> dict[str, Any]:
    """One report row: the layer, how many inputs it kept, its relative output error before/after."""
    return {"layer": c.node, "op": c.op_type, "inputs_kept": int(c.keep_in.sum()), "inputs": int(len(c.keep_in)),
            "rel_err_before": res.err_before, "rel_err_after": res.err_after, "rows": res.rows}


# -- segmented execution ----------------------------------------------------------------------------
class Segments:
    """Run a model piece by piece between cut points, keeping per-sample values of live tensors."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> None:
        self.model = model
        self.pos = 0
        self.state: dict[str, list[np.ndarray]] = {}
        for k in feeds[0]:
            self.state[k] = [f[k] for f in feeds]
        self.n = len(feeds)
        self._refresh_uses()

    def _refresh_uses(self) -> None:
        self.inits = {t.name for t in self.model.graph.initializer}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(self.model.graph.node):
            for t in node.input:
                if t:
                    self.last_use[t] = i
        for o in self.model.graph.output:
            self.last_use[o.name] = len(self.model.graph.node)

    def advance(self, stop: int) -> None:
        """Execute nodes [pos, stop) on every sample; keep only tensors read at or after `stop`."""
        if stop <= self.pos:
            return
        self._refresh_uses()  # the pruned model gains bias nodes/initializers as layers are fitted
        nodes = list(self.model.graph.node[self.pos:stop])
        produced = {o for n in nodes for o in n.output if o}
        needed_in = []
        for n in nodes:
            for t in n.input:
                if t and t not in produced and t not in self.inits and t not in needed_in:
                    if t not in self.state:
                        raise GraphpruneError(f"internal error: tensor '{t}' is not available at the cut")
                    needed_in.append(t)
        outs = [o for o in dict.fromkeys(o for n in nodes for o in n.output if o)
                if self.last_use.get(o, -1) >= stop]
        if outs:
            used_inits = {t for n in nodes for t in n.input if t in self.inits}
            graph = helper.make_graph(
                nodes, "segment",
                [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self.state[t][0].dtype), None)
                 for t in needed_in],
                [helper.make_empty_tensor_value_info(o) for o in outs],
                [t for t in self.model.graph.initializer if t.name in used_inits],
            )
            sub = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            sub.ir_version = self.model.ir_version
            sub.functions.extend(self.model.functions)
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            sess = ort_session(sub, opts)
            results: dict[str, list[np.ndarray]] = {o: [] for o in outs}
            for j in range(self.n):
                vals = sess.run(outs, {t: self.state[t][j] for t in needed_in})
                for o, v in zip(outs, vals):
                    results[o].append(v)
            self.state.update(results)
        self.pos = stop
        for t in list(self.state):
            if self.last_use.get(t, -1) < stop:
                del self.state[t]


class OnnxTarget:
    """Recovery on a pruned ModelProto: parameters through OnnxParams, activations from Segments.

    Consumers are fitted one at a time in topological order (a wave of one), each on the pruned
    model's activations that already include every earlier reconstruction.
    """

    def __init__(self, original: onnx.ModelProto, params: OnnxParams, calib: Calibration, n: int) -> None:
        self.original, self.params = original, params
        self.calib, self.n = calib, n
        self.orig: Segments | None = None
        self.slim: Segments | None = None
        self.done = 0

    def add_bias(self, c: Consumer, delta: np.ndarray) -> None:
        self.params.add_bias(c, delta)

    def set_fit(self, c: Consumer, weight: np.ndarray, bias: np.ndarray) -> None:
        self.params.set_fit(c, weight, bias)

    def waves(self, analysis: Analysis, cons: list[Consumer]) -> list[list[Consumer]]:
        self.total = len(cons)
        return [[c] for c in cons]

    def feed(self, wave: list[Consumer], fits: dict[str, LayerFit], say: Callable[[str], None]) -> None:
        if self.orig is None:
            feeds = [b for b in self.calib.batches(1, 0, self.n)]
            self.orig, self.slim = Segments(self.original, feeds), Segments(self.params.model, feeds)
        (c,) = wave
        self.done += 1
        say(f"reconstructing {c.node} ({self.done}/{self.total})")
        self.orig.advance(_find_node(self.original, c.weight))
        self.slim.advance(_find_node(self.params.model, c.weight))
        for j in range(0, self.n, 16):  # a few samples per call: fewer, larger Gram updates
            fits[c.node].add(np.concatenate(self.slim.state[c.x][j:j + 16]),
                             np.concatenate(self.orig.state[c.x][j:j + 16]), j)


# -- the recovery passes, written once for both model kinds -----------------------------------------
def run_recovery(analysis: Analysis, cons: list[Consumer], calib: Calibration, stats: ChannelStats | None,
                 opts: RecoverOptions, target: Any, collect_stats: Callable[[], ChannelStats],
                 say: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Bias compensation, then (mode lsq) sequential least-squares reconstruction of `cons`.

    `target` is the model-kind side (OnnxTarget here, recovery_torch.TorchTarget): it writes biases
    and fitted weights into the pruned model and feeds each wave of consumers the pruned and the
    original model's inputs. Returns the recovery report (per-layer errors before/after the fit).
    """
    report: dict[str, Any] = {"mode": opts.mode}
    t = time.perf_counter()
    if stats is None:
        say("calibration statistics")
        stats = collect_stats()
    report["stats_s"] = time.perf_counter() - t
    t = time.perf_counter()
    deltas = compensation(analysis, [c for c in cons if c.x in stats.sum], stats)
    for c in cons:
        if c.node in deltas:
            target.add_bias(c, deltas[c.node][c.keep_out])
    report["compensated_layers"] = len(deltas)
    report["compensate_s"] = time.perf_counter() - t
    if opts.mode != "lsq":
        return report
    t = time.perf_counter()
    fit_cons = [c for c in cons if supports(c, analysis.graph.constants[c.weight].ndim)]
    n = min(opts.lsq_samples, calib.n)
    rows = []
    bar = _progress(len(fit_cons), "reconstructing layers", opts.progress) if fit_cons else None
    for wave in target.waves(analysis, fit_cons):
        fits = {c.node: new_fit(analysis, c, opts) for c in wave}
        target.feed(wave, fits, say)
        for c in wave:
            res = fits[c.node].solve()
            target.set_fit(c, res.weight, res.bias)
            rows.append(layer_row(c, res))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    report["layers"] = rows
    report["lsq_samples"] = n
    report["reconstruct_s"] = time.perf_counter() - t
    return report


# -- agreement on held-out samples ------------------------------------------------------------------
def output_agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    """Per graph output: cosine similarity and relative L2 over all samples; top-1 agreement of the
    argmax over the last axis (per row: a classifier's class, a sequence model's token)."""
    out = []
    for r, g in zip(ref, got):
        r64, g64 = np.asarray(r, dtype=np.float64).ravel(), np.asarray(g, dtype=np.float64).ravel()
        nr, ng = np.linalg.norm(r64), np.linalg.norm(g64)
        entry = {
            "cosine": float(r64 @ g64 / (nr * ng)) if nr > 0 and ng > 0 else float(nr == ng),
            "rel_l2": float(np.linalg.norm(r64 - g64) / nr) if nr > 0 else float(np.linalg.norm(g64)),
        }
        if np.ndim(r) >= 2 and np.shape(r)[-1] > 1 and np.issubdtype(np.asarray(r).dtype, np.floating):
            entry["top1_agreement"] = float(np.mean(np.argmax(r, -1) == np.argmax(g, -1)))
        out.append(entry)
    return {"outputs": out}


def holdout_agreement(batches: Iterable[dict[str, np.ndarray]], run_ref: Callable[[Any], list[np.ndarray]],
                      run_got: Callable[[Any], list[np.ndarray]], samples: int,
                      names: list[str] | None = None) -> dict[str, Any]:
    """output_agreement of the original (`run_ref`) and the pruned model (`run_got`) over `batches`."""
    ref: list[list[np.ndarray]] = []
    got: list[list[np.ndarray]] = []
    for batch in batches:
        r, g = run_ref(batch), run_got(batch)
        if not ref:
            ref, got = [[] for _ in r], [[] for _ in g]
        for k, v in enumerate(r):
            ref[k].append(v)
        for k, v in enumerate(g):
            got[k].append(v)
    res = output_agreement([np.concatenate(v) for v in ref], [np.concatenate(v) for v in got])
    res["samples"] = samples
    for name, entry in zip(names or [], res["outputs"]):
        entry["name"] = name
    return res


def holdout_agreement_onnx(original: onnx.ModelProto, pruned: onnx.ModelProto, holdout: Calibration) -> dict[str, Any]:
    from graphprune.capture import OnnxRunner

    names = [o.name for o in original.graph.output]
    r1, r2 = OnnxRunner(original, names), OnnxRunner(pruned, names)
    return holdout_agreement(holdout.batches(r1.batch if r1.fixed_batch else 16), r1.run, r2.run, holdout.n, names)


# -- the whole recovery step for ONNX ---------------------------------------------------------------
def recover_onnx(original: onnx.ModelProto, slim: onnx.ModelProto, analysis: Analysis,
                 removed: frozenset[int], calib: Calibration, stats: ChannelStats | None,
                 opts: RecoverOptions, say: Callable[[str], None] = lambda _m: None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Compensate and/or reconstruct the pruned `slim` model (edited copy returned) with a report."""
    model = onnx.ModelProto()
    model.CopyFrom(slim)
    if opts.mode == "none" or not removed:
        return model, {"mode": opts.mode}
    params = OnnxParams(model)
    target = OnnxTarget(original, params, calib, min(opts.lsq_samples, calib.n))
    report = run_recovery(analysis, consumers(analysis, removed), calib, stats, opts, target,
                          lambda: collect_stats_onnx(original, analysis, calib, opts.progress), say)
    return model, report
