"""ONNX models (a path or a ModelProto) at the pipeline's edge: load, run, rewrite, validate, save."""
from __future__ import annotations

import os
from typing import Any, Callable

import onnx

from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import method_coverage, methods_for
from graphprune.pipeline import PruneState
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import custom_domains, masked_reference, random_feed, run_onnx, validate


class OnnxAdapter:
    """Everything ONNX-specific the pipeline needs; the IR and the passes never see a ModelProto."""

    kind = "onnx"
    lower_message = "loading the model"
    rewrite_message = "rewriting the graph"
    validate_message = "validating (checker, shape inference, onnxruntime)"
    search_note = ", calibration data through onnxruntime"
    measure_message = "measuring original vs pruned latency on onnxruntime"

    # -- load and analyse --------------------------------------------------------------------------
    def lower(self, state: PruneState) -> None:
        loaded = load_onnx(state.source, state.options.input_shape)
        state.lowered, state.graph, state.source_label = loaded, loaded.graph, loaded.source
        state.original = loaded.proto

    def analyze(self, state: PruneState) -> Analysis:
        return analyze_graph(state.graph, state.options.norm_channels)

    def check_target(self, kind: str) -> None:
        return None

    # -- what the planning passes need ---------------------------------------------------------------
    def methods(self) -> list[str]:
        return methods_for(self.kind)

    def criteria(self) -> dict[str, Callable[..., dict[int, float]]]:
        return dict(CRITERIA)

    def score_context(self, state: PruneState) -> dict[str, Any]:
        return {"loaded": state.lowered}

    def coverage(self, state: PruneState, method: str) -> dict[str, Any] | None:
        return method_coverage(state.analysis, method)

    def search_context(self, state: PruneState) -> dict[str, Any]:
        return {"onnx_model": state.lowered.proto}

    def latency_cost(self, state: PruneState) -> str:
        from graphprune.passes.latency_cost import register_latency_cost

        if custom_domains(state.lowered.proto):
            raise GraphpruneError("--target-latency is checked by measuring: it cannot be combined with --no-measure "
                                  "or custom op domains")
        return register_latency_cost(state.analysis, state.lowered, progress=state.say)

    def fit_latency(self, state: PruneState, allocate_at: Callable[[float], Any]) -> tuple[Any, onnx.ModelProto, dict]:
        """Allocate, rewrite and time the slim model, re-planning until the measured ratio meets the
        target (passes.latency_cost.fit_to_measured); the latency record carries the fit history."""
        from graphprune.backends.ort_backend import measure_speedup
        from graphprune.passes.latency_cost import fit_to_measured
        from graphprune.passes.measure import measure_budget_s

        original, feed = state.lowered.proto, self.feed(state)
        plan, slim, lat, history = fit_to_measured(
            state.options.target, allocate_at, lambda p: rewrite_onnx(original, state.analysis, p.removed),
            lambda m: measure_speedup(original, m, feed, budget_s=measure_budget_s(4.0), max_rounds=40,
                                      progress=state.say))
        lat["calibration"] = history
        return plan, slim, lat

    def feed(self, state: PruneState) -> dict:
        """The random inputs validation and timing share (seeded; --input-value fixes some)."""
        if state.feed is None:
            o = state.options
            state.feed = random_feed(state.lowered.proto, state.lowered.graph, o.seed, values=o.input_values)
        return state.feed

    def masked_runner(self, state: PruneState, calib: Any, samples: int) -> Any:
        from graphprune.passes.sensitivity import OnnxMaskedRunner, calibration_feeds

        feeds = calibration_feeds(calib, state.graph.inputs, samples)
        return OnnxMaskedRunner(state.lowered.proto, state.analysis, feeds)

    def collect_stats(self, state: PruneState, calib: Any, progress: bool | None) -> Any:
        from graphprune.recovery import collect_stats_onnx

        return collect_stats_onnx(state.lowered.proto, state.analysis, calib, progress)

    # -- rewrite, recover ----------------------------------------------------------------------------
    def rewrite(self, state: PruneState) -> onnx.ModelProto:
        return rewrite_onnx(state.lowered.proto, state.analysis, state.plan.removed)

    def recover(self, state: PruneState) -> dict[str, Any]:
        from graphprune.recovery import recover_onnx

        state.slim, report = recover_onnx(state.lowered.proto, state.slim, state.analysis, state.plan.removed,
                                          state.calibration.fit, state.stats, state.recover_options, state.say)
        return report

    def agreement(self, state: PruneState, holdout: Any) -> dict[str, Any]:
        from graphprune.recovery import holdout_agreement_onnx

        return holdout_agreement_onnx(state.lowered.proto, state.slim, holdout)

    # -- check, measure --------------------------------------------------------------------------------
    def validate(self, state: PruneState) -> None:
        """Checker, strict shape inference, an onnxruntime run against the source's output shapes and
        (without recovery) equality with the source whose removed channels' consumers are masked.

        Models with custom-op domains skip the run (onnxruntime cannot load them) and say so in the
        report. If the slim model fails, the source is checked the same way, so a broken input is
        blamed on the input rather than on the pruning.
        """
        loaded, feed = state.lowered, self.feed(state)
        expected = [loaded.graph.shape(out) for out in loaded.graph.outputs]
        custom = custom_domains(loaded.proto)
        if custom:
            state.say(f"custom op domains {custom}: onnxruntime stage skipped")
            if any(s is None for s in expected):
                raise GraphpruneError(f"model uses custom op domains {custom} and its output shapes are not declared: "
                                      "cannot validate the pruned model")
        elif any(s is None for s in expected):
            try:
                expected = [tuple(out.shape) for out in run_onnx(loaded.proto, feed)]
            except Exception as exc:  # the input itself is broken; say so instead of a traceback
                raise GraphpruneError.from_exception("input model fails to run in onnxruntime", exc) from None
        # recovery changes kept weights on purpose: the slim model then no longer equals the masked original
        reference = None if custom or state.recovered else masked_reference(loaded.proto, state.analysis,
                                                                             state.plan.removed, feed)
        try:
            validate(state.slim, feed, expected, run=not custom, reference=reference)
        except GraphpruneError as exc:
            _blame_input(loaded.proto, feed, expected, run=not custom)
            raise exc from None
        checks = ["checker", "shape inference", "channel agreement"]
        if not custom:
            checks.append("onnxruntime run (optimised and unoptimised)")
        if reference is not None:
            checks.append("equals masked original")
        state.report["validation"] = checks
        if custom:
            state.report["validation_note"] = f"onnxruntime run skipped: custom op domains {custom}"

    def measure(self, state: PruneState) -> dict[str, Any] | None:
        """Original vs pruned on onnxruntime CPU, interleaved (None: custom op domains cannot run)."""
        from graphprune.backends.ort_backend import measure_speedup
        from graphprune.passes.measure import measure_budget_s

        from graphprune.frontends.external import has_mapped

        if custom_domains(state.lowered.proto):
            return None
        if has_mapped(state.lowered.proto):
            # timing runs both models side by side in onnxruntime, which copies (re-lays out) every
            # weight of each: that alone would exceed the ~2x memory budget of a memory-mapped model
            state.report["latency_note"] = "speed-up not measured: model weights are memory-mapped (large model); use bench"
            return None
        return measure_speedup(state.lowered.proto, state.slim, self.feed(state), budget_s=measure_budget_s(3.0),
                               max_rounds=30, progress=state.say)

    def report_notes(self, state: PruneState) -> dict[str, Any]:
        return {}

    # -- the oracle and the file -----------------------------------------------------------------------
    def reference(self, state: PruneState) -> onnx.ModelProto:
        from graphprune.rewrite.masking import mask_consumers_onnx

        return mask_consumers_onnx(state.lowered.proto, state.analysis, state.plan.removed)

    def save(self, model: onnx.ModelProto, path: str | os.PathLike, overwrite: bool = True) -> None:
        from graphprune.io import write_model_atomic

        write_model_atomic(model, path, overwrite=overwrite)


def _blame_input(original: onnx.ModelProto, feed: dict, expected: list, run: bool = True) -> None:
    """A pruned model failed validation: if the input fails the same checks, say that instead."""
    try:
        validate(original, feed, expected, run=run)
    except GraphpruneError as exc:
        raise GraphpruneError(f"input model is invalid: {str(exc).replace('pruned model ', '', 1)}") from None


__all__ = ["OnnxAdapter"]
