"""ONNX models (a path or a ModelProto) at the pipeline's edge: load, capture, rewrite, validate, save."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.io import write_model_atomic
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import PLAN_METHODS
from graphprune.pipeline import PruneState
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import custom_domains, random_feed, run_onnx, validate

TARGETS = ("macs", "params", "latency")


class OnnxAdapter:
    """Everything ONNX-specific the pipeline needs; the IR and the passes never see a ModelProto."""

    kind = "onnx"
    targets = TARGETS

    def lower(self, state: PruneState) -> None:
        loaded = load_onnx(state.source, state.options.input_shape)
        state.lowered, state.graph, state.source_label = loaded, loaded.graph, loaded.source

    def analyze(self, state: PruneState) -> Analysis:
        return analyze_graph(state.graph)

    def criteria(self) -> dict[str, Callable[..., dict[int, float]]]:
        return dict(CRITERIA)

    def methods(self) -> list[str]:
        return sorted([*CRITERIA, *PLAN_METHODS])

    def check_target(self, kind: str) -> None:
        return None

    def score_context(self, state: PruneState) -> dict[str, Any]:
        return {"loaded": state.lowered}

    def search_context(self, state: PruneState) -> dict[str, Any]:
        return {"onnx_model": state.lowered.proto}

    def latency_cost(self, state: PruneState) -> str:
        from graphprune.passes.latency_cost import register_latency_cost

        kind = register_latency_cost(state.analysis, state.lowered, progress=state.say)
        state.cost_info["latency"] = getattr(state.analysis, "latency_info", None)
        return kind

    def capture(self, state: PruneState, tensors: Sequence[str], inputs: Any) -> dict[str, np.ndarray]:
        """Run the original model in onnxruntime with `tensors` added as outputs.

        A static batch dimension is honoured by feeding that many samples at a time (one at a time
        for the usual batch-1 export); a dynamic one gets chunks of up to 64.
        """
        import onnxruntime as ort

        proto = onnx.ModelProto.FromString(state.lowered.proto.SerializeToString())
        have = {o.name for o in proto.graph.output}
        for t in tensors:
            if t not in have:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
        try:
            sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise GraphpruneError.from_exception("cannot capture activations: onnxruntime rejects the model", exc) from None
        real = [i for i in sess.get_inputs()]
        feeds = inputs if isinstance(inputs, dict) else {real[0].name: inputs}
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        batch = real[0].shape[0] if real and isinstance(real[0].shape[0], int) else 64
        if n % batch:
            raise GraphpruneError(f"the model's batch size is fixed at {batch}: give a multiple of {batch} "
                                  f"calibration samples (got {n})")
        store: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        names = list(tensors)
        for i in range(0, n, batch):
            feed = {k: np.ascontiguousarray(v[i: i + batch]) for k, v in feeds.items()}
            try:
                outs = sess.run(names, feed)
            except Exception as exc:
                raise GraphpruneError.from_exception("calibration data does not fit the model", exc) from None
            for t, o in zip(names, outs):
                store[t].append(np.asarray(o))
        return {t: np.concatenate(v) for t, v in store.items()}

    def rewrite(self, state: PruneState) -> onnx.ModelProto:
        proto = state.lowered.proto
        if state.param_updates:
            proto = _with_initializers(proto, state.param_updates)
        return rewrite_onnx(proto, state.analysis, state.plan.removed)

    def validate(self, state: PruneState) -> None:
        """Checker, strict shape inference and an onnxruntime run against the source's output shapes.

        Models with custom-op domains skip the run (onnxruntime cannot load them) and say so in the
        report. If the slim model fails, the source is checked the same way, so a broken input is
        blamed on the input rather than on the pruning.
        """
        loaded, seed = state.lowered, state.options.seed
        feed = random_feed(loaded.proto, loaded.graph, seed)
        expected = [loaded.graph.shape(o) for o in loaded.graph.outputs]
        custom = custom_domains(loaded.proto)
        if custom:
            state.say(f"custom op domains {custom}: onnxruntime stage skipped")
            if any(s is None for s in expected):
                raise GraphpruneError(f"model uses custom op domains {custom} and its output shapes are not declared: "
                                      "cannot validate the pruned model")
        elif any(s is None for s in expected):
            try:
                expected = [tuple(o.shape) for o in run_onnx(loaded.proto, feed)]
            except Exception as exc:  # the input itself is broken; say so instead of a traceback
                raise GraphpruneError.from_exception("input model fails to run in onnxruntime", exc) from None
        try:
            validate(state.slim, feed, expected, run=not custom)
        except GraphpruneError as exc:
            _blame_input(loaded.proto, feed, expected, run=not custom)
            raise exc from None
        state.feed = feed
        state.report["validation"] = (["checker", "shape inference"] if custom
                                      else ["checker", "shape inference", "onnxruntime run"])
        if custom:
            state.report["validation_note"] = f"onnxruntime run skipped: custom op domains {custom}"

    def measure_latency(self, state: PruneState) -> dict[str, Any]:
        from graphprune.passes.latency_cost import time_model

        feed = state.feed if state.feed is not None else random_feed(state.lowered.proto, state.graph, state.options.seed)
        before = time_model(state.lowered.proto, feed, runs=20)
        after = time_model(state.slim, feed, runs=20)
        return {"backend": "onnxruntime", "threads": 1, "before_ms": before, "after_ms": after,
                "ratio": after / before, "predicted_ratio": state.plan.achieved}

    def reference(self, state: PruneState) -> onnx.ModelProto:
        proto = state.lowered.proto
        if state.param_updates:
            proto = _with_initializers(proto, state.param_updates)
        return mask_consumers_onnx(proto, state.analysis, state.plan.removed)

    def save(self, model: onnx.ModelProto, path: str | os.PathLike, overwrite: bool = True) -> None:
        write_model_atomic(model, path, overwrite=overwrite)


def _with_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `proto` with the named initializers replaced (same shape, same dtype)."""
    model = copy.deepcopy(proto)
    index = {init.name: k for k, init in enumerate(model.graph.initializer)}
    for name, value in values.items():
        k = index.get(name)
        if k is None:
            raise GraphpruneError(f"recovered parameter {name!r} is not an initializer of the model")
        old = model.graph.initializer[k]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        value = np.asarray(value)
        if tuple(value.shape) != tuple(old.dims):
            raise GraphpruneError(f"recovered parameter {name!r} has shape {tuple(value.shape)}, "
                                  f"the model's is {tuple(old.dims)}")
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))
    return model


def _blame_input(original: onnx.ModelProto, feed: dict, expected: list, run: bool = True) -> None:
    """A pruned model failed validation: if the input fails the same checks, say that instead."""
    try:
        validate(original, feed, expected, run=run)
    except GraphpruneError as exc:
        raise GraphpruneError(f"input model is invalid: {str(exc).replace('pruned model ', '', 1)}") from None


__all__ = ["OnnxAdapter"]
