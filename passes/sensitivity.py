"""Sensitivity-aware allocation: measure what removing part of each group does to the model's output,
then spend the cost budget where it hurts least.

Weight-magnitude ranking across layers empties narrow early layers (a few channels there carry a
whole stage) while wide redundant layers stay whole. Here each prunable group is pruned alone, in its
importance order, at a few ratios; the model runs on a small calibration subset with those channels
replaced by their calibration mean (what bias compensation leaves behind, so the sensitivity is
measured "with recovery applied"), and the output distortion ||y' - y||^2 / ||y||^2 is recorded.

Allocation is a knapsack over these curves solved by its Lagrangian: per group, the lower convex
envelope of distortion against cost saved gives a non-decreasing price (distortion per unit of
cost) for every channel in importance order; allocate()'s global greedy then removes the cheapest
chunks first and meets the target exactly (same tolerance and fill-back as every other strategy).
Distortions of different groups are assumed to add, which holds for small ones.

The pass is model-agnostic: it asks a `MaskedRunner` for outputs under a set of replaced channels.
ONNX models get one onnxruntime session whose consumer inputs are rewired through `x * m + c` (m, c
fed per run, so no session is rebuilt); nn.Modules get the same rewiring in their fx graph.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError
from graphprune.frontends.external import ort_session
from graphprune.passes.allocate import IncrementalCost, Plan, _chunks, allocate

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
DEFAULT_SAMPLES = 8
Progress = Callable[[str], None]


class MaskedRunner(Protocol):
    """Runs the model on the calibration subset with some channels replaced by their mean."""

    def outputs(self, removed: frozenset[int]) -> list[np.ndarray]: ...


@dataclass
class Sensitivity:
    """Measured curves: per group, (classes removed, distortion) points starting at (0, 0)."""

    curves: dict[int, list[tuple[int, float]]]
    runs: int
    seconds: float
    samples: int
    ratios: tuple[float, ...]
    prices: dict[int, float] = field(default_factory=dict)  # class -> distortion per unit of cost

    def to_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "seconds": round(self.seconds, 3), "samples": self.samples,
                "ratios": list(self.ratios),
                "curves": {str(g): [[n, float(d)] for n, d in pts] for g, pts in self.curves.items()}}


def distortion(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over outputs of the relative squared error ||y' - y||^2 / ||y||^2."""
    vals = []
    for y, z in zip(reference, got):
        y = np.asarray(y, np.float64)
        den = float((y * y).sum()) or 1.0
        vals.append(float(((np.asarray(z, np.float64) - y) ** 2).sum()) / den)
    return float(np.mean(vals)) if vals else 0.0


def measure(analysis: Analysis, order: dict[int, list[list[int]]], runner: MaskedRunner, *,
            ratios: Sequence[float] = DEFAULT_RATIOS, samples: int = 0, progress: Progress | None = None) -> Sensitivity:
    """Distortion of each group pruned alone to each ratio (whole chunks, in importance order)."""
    t0 = time.perf_counter()
    reference = runner.outputs(frozenset())
    curves: dict[int, list[tuple[int, float]]] = {}
    runs = 0
    for k, (gid, chunks) in enumerate(order.items()):
        if progress:
            progress(f"sensitivity: group {k + 1}/{len(order)} ({analysis.groups[gid].size} channels)")
        size = analysis.groups[gid].size
        bounds = np.cumsum([len(c) for c in chunks])
        points = [(0, 0.0)]
        for r in sorted(set(ratios)):
            n_chunks = int(np.searchsorted(bounds, r * size, side="right"))
            if n_chunks == 0 or bounds[n_chunks - 1] <= points[-1][0]:
                continue
            removed = frozenset(c for chunk in chunks[:n_chunks] for c in chunk)
            points.append((int(bounds[n_chunks - 1]), distortion(reference, runner.outputs(removed))))
            runs += 1
        curves[gid] = points
    return Sensitivity(curves, runs, time.perf_counter() - t0, samples, tuple(ratios))


def _envelope_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Slopes of the lower convex envelope of points (x increasing, starting at (0, 0)), one per segment."""
    hull = [0]
    for i in range(1, len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the line a -> i: drop it
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    slopes = np.empty(len(x) - 1)
    for a, b in zip(hull[:-1], hull[1:]):
        slopes[a:b] = (y[b] - y[a]) / max(x[b] - x[a], 1e-300)
    return slopes


def prices(analysis: Analysis, order: dict[int, list[list[int]]], sens: Sensitivity, kind: str) -> dict[int, float]:
    """Per class, distortion per unit of cost saved; strictly increasing along each group's order."""
    out: dict[int, float] = {}
    for gid, chunks in order.items():
        cost = IncrementalCost(analysis, kind)
        saved = [0.0]
        for chunk in chunks:
            for c in chunk:
                cost.remove(c)
            saved.append(cost.base_total - cost.total)
        pts = sens.curves.get(gid, [(0, 0.0)])
        n_at = np.concatenate([[0], np.cumsum([len(c) for c in chunks])])
        # distortion at every chunk boundary: interpolated between measured points, extrapolated past
        # the last one along the last measured segment (never below the last measured value)
        xs = np.array([p[0] for p in pts], float)
        ys = np.maximum.accumulate(np.array([p[1] for p in pts], float))
        if len(xs) >= 2:
            d = np.interp(n_at, xs, ys)
            slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1.0)
            beyond = n_at > xs[-1]
            d[beyond] = ys[-1] + slope * (n_at[beyond] - xs[-1])
        else:  # nothing measured (every ratio below one chunk): price by a single chunk's worth
            d = n_at.astype(float) * np.inf
            d[0] = 0.0
        slopes = _envelope_slopes(np.array(saved), d)
        last = -np.inf
        for chunk, s in zip(chunks, slopes):
            s = float(s) if np.isfinite(s) else 1e300
            for c in chunk:
                s = max(s, float(np.nextafter(last, np.inf)))
                out[c] = s
                last = s
        # classes the order leaves out (kept to honour the group's minimum) come last, never first
        for c in analysis.groups[gid].classes:
            out.setdefault(c, np.inf)
    return out


def sensitivity_allocate(
    analysis: Analysis,
    scores: dict[int, float],
    runner: MaskedRunner,
    *,
    target: float,
    kind: str = "macs",
    round_to: int | Mapping[int, int] = 1,
    protected: set[int] | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    samples: int = 0,
    progress: Progress | None = None,
) -> tuple[Plan, Sensitivity]:
    """Plan meeting `target` with per-group budgets from measured sensitivity; `scores` order each group."""
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise GraphpruneError(f"sensitivity ratios must lie in (0, 1), got {list(ratios)}")
    order = _chunks(analysis, dict(scores), protected or set(), round_to, normalize=False)
    sens = measure(analysis, order, runner, ratios=ratios, samples=samples, progress=progress)
    sens.prices = prices(analysis, order, sens, kind)
    plan = allocate(analysis, sens.prices, target=target, kind=kind, strategy="global", round_to=round_to,
                    protected=protected, normalize=False)
    return plan, sens


def calibration_feeds(calib: Any, input_names: list[str], samples: int = DEFAULT_SAMPLES,
                      batch: int = 1) -> list[dict[str, Any]]:
    """The first `samples` calibration samples as feeds of `batch` samples (batch 1: static exports).

    Accepts an array (single-input model), a dict input name -> array (samples on axis 0), an object
    with `batches(size)` (graphprune's Calibration), or an iterable of such batches.
    """
    if calib is None:
        raise GraphpruneError("strategy sensitivity needs calibration data (calib=... / --calib)")
    if samples < 1:
        raise GraphpruneError(f"sensitivity samples must be >= 1, got {samples}")
    if isinstance(calib, (str, os.PathLike)):
        calib = _load_npz(os.fspath(calib), input_names)
    if hasattr(calib, "batches"):
        chunks = calib.batches(batch)
    elif isinstance(calib, dict):
        chunks = [calib]
    elif hasattr(calib, "shape"):
        if len(input_names) != 1:
            raise GraphpruneError(f"the model has inputs {input_names}: give calibration data as a dict name -> array")
        chunks = [{input_names[0]: calib}]
    else:
        chunks = (b if isinstance(b, dict) else {input_names[0]: b} for b in calib)
    feeds: list[dict[str, Any]] = []
    for chunk in chunks:
        missing = [n for n in input_names if n not in chunk]
        if missing:
            raise GraphpruneError(f"calibration data has no array for model input(s) {missing}")
        n = len(chunk[input_names[0]])
        for i in range(0, n, batch):
            feeds.append({k: chunk[k][i:i + batch] for k in input_names})
            if len(feeds) * batch >= samples:
                return feeds
    if not feeds:
        raise GraphpruneError("calibration data is empty")
    return feeds


def _load_npz(path: str, input_names: list[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise GraphpruneError(f"cannot read calibration file {path}: {type(exc).__name__}") from None
    if all(n in arrays for n in input_names):
        return {n: arrays[n] for n in input_names}
    if len(input_names) == 1 and ("x" in arrays or len(arrays) == 1):
        return {input_names[0]: arrays["x"] if "x" in arrays else next(iter(arrays.values()))}
    raise GraphpruneError(f"calibration file {path} has arrays {sorted(arrays)}; the model inputs are {input_names}")


# -- runners ----------------------------------------------------------------------------------------
def consumer_inputs(analysis: Analysis) -> dict[str, list[str]]:
    """Tensor -> nodes that read it as a weighted layer's input: where a removed channel is replaced."""
    out: dict[str, list[str]] = {}
    for b in analysis.bindings:
        if b.role == "in" and b.node not in out.get(b.tensor, []):
            out.setdefault(b.tensor, []).append(b.node)
    return out


def _broadcast_shape(analysis: Analysis, tensor: str) -> list[int]:
    shape = analysis.graph.shape(tensor)
    axis = analysis.ctx.spaces[tensor].axis
    if shape is None or axis is None:
        raise GraphpruneError(f"sensitivity: unknown layout of tensor '{tensor}'")
    out = [1] * (len(shape) - axis)
    out[0] = len(analysis.roots[tensor])
    return out


class OnnxMaskedRunner:
    """One onnxruntime session of the model with every consumer input rewired through x * m + c.

    c = (1 - m) * mean, the calibration mean of each channel: a removed channel contributes what bias
    compensation would fold into its consumers' biases.
    """

    def __init__(self, proto: Any, analysis: Analysis, feeds: list[dict[str, np.ndarray]], threads: int = 1) -> None:
        import onnx
        from onnx import helper

        self.analysis = analysis
        self.feeds = feeds
        self.tensors = sorted(consumer_inputs(analysis))
        self.shapes = {t: _broadcast_shape(analysis, t) for t in self.tensors}
        means_model = onnx.ModelProto()
        means_model.CopyFrom(proto)
        g = means_model.graph
        known_outputs = {o.name for o in g.output}
        for t in self.tensors:
            if t not in known_outputs:
                g.output.append(helper.make_empty_tensor_value_info(t))
        sess = self._session(means_model, threads)
        names = [o.name for o in sess.get_outputs()]
        sums: dict[str, np.ndarray] = {}
        for feed in feeds:
            got = dict(zip(names, sess.run(None, feed)))
            for t in self.tensors:
                x = np.asarray(got[t], np.float64)
                axis = analysis.ctx.spaces[t].axis
                red = tuple(i for i in range(x.ndim) if i != axis)
                sums[t] = sums.get(t, 0.0) + x.mean(axis=red)
        self.means = {t: (sums[t] / max(len(feeds), 1)).astype(np.float32) for t in self.tensors}
        del sess
        masked = onnx.ModelProto()
        masked.CopyFrom(proto)
        g = masked.graph
        by_name = {n.name: n for n in g.node}
        for t in self.tensors:
            m_in, c_in, mid, out = f"{t}__gp_mask", f"{t}__gp_fill", f"{t}__gp_mul", f"{t}__gp_masked"
            g.input.append(helper.make_tensor_value_info(m_in, onnx.TensorProto.FLOAT, self.shapes[t]))
            g.input.append(helper.make_tensor_value_info(c_in, onnx.TensorProto.FLOAT, self.shapes[t]))
            g.node.append(helper.make_node("Mul", [t, m_in], [mid], name=f"{t}__gp_mul_node"))
            g.node.append(helper.make_node("Add", [mid, c_in], [out], name=f"{t}__gp_add_node"))
            for node_name in consumer_inputs(analysis)[t]:
                node = by_name[node_name]
                for i, name in enumerate(node.input):
                    if name == t:
                        node.input[i] = out
        _toposort(masked.graph)
        self.session = self._session(masked, threads)
        self.output_names = [o.name for o in proto.graph.output]

    @staticmethod
    def _session(model: Any, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort_session(model, opts)

    def outputs(self, removed: frozenset[int]) -> list[np.ndarray]:
        keep = self.analysis.keep_masks(removed) if removed else {}
        extra = {}
        for t in self.tensors:
            m = keep[t].astype(np.float32) if removed else np.ones(self.shapes[t][0], np.float32)
            extra[f"{t}__gp_mask"] = m.reshape(self.shapes[t])
            extra[f"{t}__gp_fill"] = ((1 - m) * self.means[t]).reshape(self.shapes[t])
        outs = [self.session.run(self.output_names, {**feed, **extra}) for feed in self.feeds]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(self.output_names))]


def _toposort(graph: Any) -> None:
    """Reorder nodes so every input is produced before it is read (the new Mul/Add nodes went last)."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered.extend(rest)  # subgraph-captured names etc.: keep the original order for the remainder
            break
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


class TorchMaskedRunner:
    """The nn.Module's fx graph with every consumer input rewired through x * m + c (as for ONNX)."""

    def __init__(self, analysis: Analysis, batches: list[Any]) -> None:
        import copy

        import torch

        traced = getattr(analysis, "traced", None)
        if traced is None:
            raise GraphpruneError("sensitivity: the module's traced graph is missing from the analysis")
        self.analysis = analysis
        self.batches = [b if isinstance(b, tuple) else (b,) for b in batches]
        self.tensors = sorted(consumer_inputs(analysis))
        self.shapes = {t: _broadcast_shape(analysis, t) for t in self.tensors}
        gm = copy.deepcopy(traced.gm)
        for m in gm.modules():  # eval mode by the flag: modules from torch.export refuse .eval()
            m.training = False
        by_name = {n.name: n for n in gm.graph.nodes}
        # IR names are not always fx node names (torch.export: 'chunk:1' is a getitem node): map
        # through the trace's own tables, then to the copy's nodes by name
        fx_name = {t: (traced.tensor_fx[t].name if t in traced.tensor_fx else t) for t in self.tensors}
        fx_of = {t: by_name[fx_name[t]] for t in self.tensors}
        node_of = {n: by_name[traced.origin[n].name if n in traced.origin else n]
                   for t in self.tensors for n in consumer_inputs(analysis)[t]}
        # the mean of each consumer input, from forward hooks on a plain run of the same graph
        sums: dict[str, torch.Tensor] = {}
        self.means: dict[str, np.ndarray] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.fills: dict[str, torch.Tensor] = {}
        capture = [fx_of[t] for t in self.tensors]
        recorder = _Recorder(gm, {n.name for n in capture})
        with torch.no_grad():
            for b in self.batches:
                recorder.run(*b)
                for t in self.tensors:
                    x = recorder.values[fx_name[t]].double()
                    axis = analysis.ctx.spaces[t].axis
                    red = tuple(i for i in range(x.ndim) if i != axis)
                    sums[t] = sums.get(t, 0) + x.mean(dim=red)
        for k, t in enumerate(self.tensors):
            self.means[t] = (sums[t] / len(self.batches)).float().numpy()
            mask = torch.ones(self.shapes[t])
            fill = torch.zeros(self.shapes[t])
            gm.register_buffer(f"_gp_mask_{k}", mask)
            gm.register_buffer(f"_gp_fill_{k}", fill)
            self.masks[t], self.fills[t] = mask, fill
            src = fx_of[t]
            consumers = [node_of[n] for n in consumer_inputs(analysis)[t]]
            with gm.graph.inserting_after(src):
                m_node = gm.graph.get_attr(f"_gp_mask_{k}")
            with gm.graph.inserting_after(m_node):
                f_node = gm.graph.get_attr(f"_gp_fill_{k}")
            with gm.graph.inserting_after(f_node):
                mul = gm.graph.call_function(torch.mul, (src, m_node))
            with gm.graph.inserting_after(mul):
                add = gm.graph.call_function(torch.add, (mul, f_node))
            for c in consumers:
                c.replace_input_with(src, add)
        gm.recompile()
        self.gm = gm

    def outputs(self, removed: frozenset[int]) -> list[np.ndarray]:
        import torch

        keep = self.analysis.keep_masks(removed) if removed else {}
        for t in self.tensors:
            m = keep[t].astype(np.float32) if removed else np.ones(self.shapes[t][0], np.float32)
            self.masks[t].copy_(torch.from_numpy(m.reshape(self.shapes[t])))
            self.fills[t].copy_(torch.from_numpy(((1 - m) * self.means[t]).reshape(self.shapes[t])))
        outs = []
        with torch.no_grad():
            for b in self.batches:
                y = self.gm(*b)
                outs.append([t.detach().cpu().numpy() for t in torch.utils._pytree.tree_leaves(y)
                             if isinstance(t, torch.Tensor)])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


class _Recorder:
    """Runs a GraphModule node by node and keeps the values of the named nodes."""

    def __init__(self, gm: Any, names: set[str]) -> None:
        import torch.fx

        class _Interp(torch.fx.Interpreter):
            def run_node(inner, n):  # noqa: N805
                v = super().run_node(n)
                if n.name in names:
                    self.values[n.name] = v
                return v

        self.values: dict[str, Any] = {}
        self.interp = _Interp(gm)

    def run(self, *args: Any) -> None:
        self.interp.run(*args)
