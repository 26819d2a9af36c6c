"""The pipeline's standard passes and the default pipeline, written once for ONNX and PyTorch.

Each pass is small: it reads a few fields of the PruneState, writes a few, and leaves anything that
depends on the model format to `state.adapter`. `default_passes(options)` is the whole pruning
pipeline in one list; read it first.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from graphprune.analysis.plan import Plan
from graphprune.errors import GraphpruneError
from graphprune.passes.allocate import allocate, ignore_reasons
from graphprune.passes.methods import PLAN_METHODS, di_plan
from graphprune.pipeline import Pass, PruneOptions, PruneState


def unknown_method_error(method: str, choices: Sequence[str]) -> GraphpruneError:
    return GraphpruneError(f"unknown or unsupported method {method!r} for this model; choose from {sorted(choices)}")


# -- load and analyse ------------------------------------------------------------------------------
class Lower(Pass):
    """Load (ONNX) or trace (PyTorch) the source model into the IR."""

    name, time_key = "lower", "load_s"

    def describe(self, state: PruneState) -> str | None:
        return "tracing with torch.fx" if state.adapter.kind == "torch" else "loading the model"

    def run(self, state: PruneState) -> PruneState:
        state.adapter.lower(state)
        return state


class Analyze(Pass):
    """Channel-dependency analysis: classes, groups, frozen reasons, cost model (the shared rule table)."""

    name, time_key, message = "analyze", "analyze_s", "analysing channel dependencies"

    def run(self, state: PruneState) -> PruneState:
        state.need("graph")
        state.analysis = state.adapter.analyze(state)
        return state


# -- plan ------------------------------------------------------------------------------------------
class LatencyCost(Pass):
    """Measure per-layer latency and register it as a cost model, so allocation can target latency."""

    name, time_key, message = "latency_cost", "plan_s", "measuring per-layer latency"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        state.cost_kind = state.adapter.latency_cost(state)
        return state


class ExplicitPlan(Pass):
    """The user's own plan (`removed=`): no scoring, no allocation; reported against MACs."""

    name, time_key = "explicit_plan", "plan_s"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        removed = frozenset(state.options.removed or ())
        state.plan = Plan(removed, "macs", 1.0, state.analysis.macs(), state.analysis.macs(removed))
        return state


class SearchPlan(Pass):
    """A data-driven structure search (di) that returns a plan meeting the target directly."""

    name, time_key = "search", "plan_s"

    def describe(self, state: PruneState) -> str | None:
        where = ", calibration data through onnxruntime" if state.adapter.kind == "onnx" else ""
        return f"searching the structure ({state.options.method}{where})"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        o, a = state.options, state.analysis
        kind = state.cost_kind or o.target_kind
        options = dict(o.method_options)
        if o.calibration is not None:
            options["calib"] = o.calibration
        found = di_plan(a, o.target, kind, options, **state.adapter.search_context(state))
        state.plan = Plan(found, kind, o.target, a.cost(kind), a.cost(kind, found))
        return state


class Score(Pass):
    """Importance per channel class from a criterion the adapter supports (or the user's scores)."""

    name, time_key = "score", "plan_s"

    def describe(self, state: PruneState) -> str | None:
        return f"scoring channels ({state.options.method})"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis")
        o = state.options
        if o.scores is not None:
            state.scores = o.scores
            return state
        fn = state.adapter.criteria().get(o.method)
        if fn is None:
            raise unknown_method_error(o.method, state.adapter.methods())
        state.scores = fn(state.analysis, seed=o.seed, **state.adapter.score_context(state), **o.method_options)
        return state


class Allocate(Pass):
    """Turn scores into removed classes meeting the cost target (global or uniform, rounded)."""

    name, time_key, message = "allocate", "plan_s", "allocating the budget"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "scores")
        o = state.options
        if o.ignore:
            state.protected, unmatched = ignore_reasons(state.analysis, list(o.ignore))
            state.warnings += [f"--ignore {p!r} matches no layer or parameter name" for p in unmatched]
        state.plan = allocate(state.analysis, state.scores, target=o.target, kind=state.cost_kind or o.target_kind,
                              strategy=o.strategy, round_to=o.round_to, protected=set(state.protected))
        return state


# -- recovery (calibration-driven) ------------------------------------------------------------------
class CaptureActivations(Pass):
    """Record the ORIGINAL model's values of the given IR tensors on the calibration inputs.

    `tensors(state)` chooses which (e.g. the inputs of every layer that reads a removed channel);
    the values land in state.activations for the recovery passes after it.
    """

    name, time_key, message = "capture", "recover_s", "capturing activations on the calibration data"

    def __init__(self, tensors: Callable[[PruneState], Sequence[str]], inputs: Callable[[PruneState], Any] | None = None):
        self.tensors = tensors
        self.inputs = inputs or calibration_inputs

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "plan")
        wanted = [t for t in self.tensors(state) if t not in state.activations]
        if wanted:
            state.activations.update(state.adapter.capture(state, wanted, self.inputs(state)))
        return state


def calibration_inputs(state: PruneState) -> Any:
    """The model inputs of the calibration data: `x` of an (x, y) pair or of an .npz file, else the data itself."""
    calib = state.options.calibration
    if isinstance(calib, str):
        try:
            with np.load(calib) as data:
                return data["x"]
        except (OSError, KeyError, ValueError) as exc:
            raise GraphpruneError(f"cannot read calibration file {calib}: needs an array 'x' ({exc})") from None
    if isinstance(calib, tuple) and len(calib) == 2:
        return calib[0]
    return calib


def recovery_passes(options: PruneOptions) -> list[Pass]:
    """THE SLOT for calibration-driven recovery; runs between planning and rewriting, only when
    calibration data is given. Empty for now: capture, bias compensation and least-squares
    reconstruction are added here, e.g.

        return [CaptureActivations(consumer_inputs), BiasCompensation(), Reconstruct()]

    Contract: a recovery pass reads state.analysis, state.plan and state.activations (fill them with
    CaptureActivations) and writes state.param_updates: new values for parameters of the ORIGINAL
    model (full shapes, keyed by parameter name; ONNX initializer names equal PyTorch
    named_parameters() names). The adapter's rewrite applies them before slicing, so both model kinds
    get the same recovered weights, and the masking oracle changes accordingly (say so in tests).
    """
    return []


# -- rewrite, check, measure, report ---------------------------------------------------------------
class Rewrite(Pass):
    """Cut the removed channels out of the real model (after applying any recovered weights)."""

    name, time_key = "rewrite", "rewrite_s"

    def describe(self, state: PruneState) -> str | None:
        return "rewriting modules" if state.adapter.kind == "torch" else "rewriting the graph"

    def run(self, state: PruneState) -> PruneState:
        state.need("analysis", "plan")
        state.slim = state.adapter.rewrite(state)
        return state


class Validate(Pass):
    """Check the slim model (ONNX: checker, shape inference, onnxruntime; PyTorch: a forward pass)."""

    name, time_key = "validate", "validate_s"

    def describe(self, state: PruneState) -> str | None:
        if state.adapter.kind == "torch":
            return "validating (forward pass on the example inputs)"
        return "validating (checker, shape inference, onnxruntime)"

    def run(self, state: PruneState) -> PruneState:
        state.need("slim")
        state.adapter.validate(state)
        return state


class MeasureLatency(Pass):
    """Time the source and the slim model on the same inputs (report['latency'])."""

    name, time_key, message = "measure", "measure_s", "measuring pruned latency"

    def run(self, state: PruneState) -> PruneState:
        state.need("slim")
        state.report["latency"] = state.adapter.measure_latency(state)
        return state


class Report(Pass):
    """The JSON-ready report: targets, achieved costs, groups; notes earlier passes left are kept."""

    name, time_key = "report", "report_s"

    def run(self, state: PruneState) -> PruneState:
        from graphprune.report.summary import build_report

        state.need("analysis", "plan")
        o = state.options
        report = build_report(state.analysis, state.plan, method=o.method, strategy=o.strategy, round_to=o.round_to,
                              times=state.times, source=state.source_label, ignored=state.protected,
                              warnings=state.warnings)
        report.update(state.report)
        state.report = report
        return state


def plan_passes(options: PruneOptions) -> list[Pass]:
    """How the plan is made: an explicit plan, a structure search, or scores + allocation."""
    if options.removed is not None:
        return [ExplicitPlan()]
    out: list[Pass] = [LatencyCost()] if options.target_kind == "latency" else []
    if options.method in PLAN_METHODS and options.scores is None:
        return out + [SearchPlan()]
    return out + [Score(), Allocate()]


def default_passes(options: PruneOptions) -> list[Pass]:
    """The pruning pipeline, in one place:

        lower -> analyze -> plan -> [recover, with calibration data] -> rewrite -> validate
              -> [measure, for latency targets] -> report
    """
    passes: list[Pass] = [Lower(), Analyze(), *plan_passes(options)]
    if options.calibration is not None:
        passes += recovery_passes(options)
    passes += [Rewrite(), Validate()]
    if options.target_kind == "latency" and options.removed is None:
        passes.append(MeasureLatency())
    passes.append(Report())
    return passes


def analysis_passes() -> list[Pass]:
    """What `graphprune.analyze` and `graphprune inspect` run: the first two passes of pruning."""
    return [Lower(), Analyze()]
