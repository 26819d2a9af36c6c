"""The public Python API. The CLI is a thin layer over these functions."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import LoadedModel, load_onnx
from graphprune.io import write_model_atomic
from graphprune.passes.allocate import Plan, allocate, ignored_classes
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import (PLAN_METHODS, TRAINING_METHODS, check_strict, di_plan, method_coverage,
                                       training_method_error)
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import custom_domains, random_feed, run_onnx, validate

Progress = Callable[[str], None]


@dataclass
class PruneResult:
    """What prune() produced: the slim model, the plan behind it and a JSON-ready report."""

    model: Any
    analysis: Analysis
    plan: Plan
    report: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        if isinstance(self.model, onnx.ModelProto):
            write_model_atomic(self.model, path, overwrite=overwrite)
        else:
            from graphprune.torch_io import save as save_module

            save_module(self.model, path)


def _is_torch_module(model: Any) -> bool:
    # an nn.Module can only exist if torch is already imported; importing it here costs seconds
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def analyze(model: Any, example_inputs: Any = None, *, input_shape: dict[str, tuple[int, ...]] | None = None) -> Analysis:
    """Dependency analysis of an ONNX model (path or ModelProto) or an nn.Module (with example inputs)."""
    if _is_torch_module(model):
        from graphprune.frontends.fx_frontend import analyze_module

        return analyze_module(model, example_inputs)
    return analyze_graph(load_onnx(model, input_shape).graph)


def _parse_target(target_flops: float | None, target_params: float | None, target_latency: float | None) -> tuple[str, float]:
    given = [(k, v) for k, v in (("macs", target_flops), ("params", target_params), ("latency", target_latency)) if v is not None]
    if len(given) != 1:
        raise GraphpruneError("give exactly one of target_flops, target_params, target_latency")
    kind, value = given[0]
    if not 0 < float(value) <= 1:
        raise GraphpruneError(f"target must be a fraction kept in (0, 1], got {value}")
    return kind, float(value)


def score_classes(analysis: Analysis, method: str, *, seed: int = 0, **options: Any) -> dict[int, float]:
    """Importance scores for the weight-only criteria (data-driven methods live in their own passes)."""
    fn = CRITERIA.get(method)
    if fn is None:
        raise GraphpruneError(f"unknown or unsupported method {method!r} for this model; choose from {sorted(CRITERIA)}")
    return fn(analysis, seed=seed, **options)


def _sensitivity_options(options: dict[str, Any]) -> dict[str, Any]:
    """sensitivity_samples / sensitivity_ratios from the prune() options, with the pass's defaults."""
    from graphprune.passes.sensitivity import DEFAULT_RATIOS, DEFAULT_SAMPLES

    samples = int(options.get("sensitivity_samples", DEFAULT_SAMPLES))
    ratios = tuple(float(r) for r in options.get("sensitivity_ratios", DEFAULT_RATIOS))
    return {"samples": samples, "ratios": ratios}


def _blame_input(original: onnx.ModelProto, feed: dict, expected: list, run: bool = True) -> None:
    """A pruned model failed validation: if the input fails the same checks, say that instead."""
    try:
        validate(original, feed, expected, run=run)
    except GraphpruneError as exc:
        raise GraphpruneError(f"input model is invalid: {str(exc).replace('pruned model ', '', 1)}") from None


def prune(
    model: Any,
    example_inputs: Any = None,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    method: str = "l1",
    strategy: str = "global",
    round_to: int = 1,
    ignore: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    input_shape: dict[str, tuple[int, ...]] | None = None,
    scores: dict[int, float] | None = None,
    removed: set[int] | frozenset[int] | None = None,
    progress: Progress | None = None,
    strict_method: bool = False,
    **method_options: Any,
) -> PruneResult:
    """Prune `model` to a cost target and return the validated slim model with a report.

    The report lists which groups `method` scored and which fell back to another criterion;
    `strict_method=True` makes any fallback an error instead.

    ONNX models (path or ModelProto) come back as a ModelProto; nn.Modules as a smaller nn.Module.
    Pass `scores` to use your own importance, or `removed` to apply an explicit plan.
    """
    if _is_torch_module(model):
        from graphprune.torch_prune import prune_module

        return prune_module(
            model, example_inputs, target_flops=target_flops, target_params=target_params, method=method,
            strategy=strategy, round_to=round_to, ignore=ignore, seed=seed, scores=scores, removed=removed,
            progress=progress, strict_method=strict_method, **method_options,
        )
    say = progress or (lambda _msg: None)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded: LoadedModel = load_onnx(model, input_shape)
    times["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    say("analysing channel dependencies")
    analysis = analyze_graph(loaded.graph)
    times["analyze_s"] = time.perf_counter() - t

    t = time.perf_counter()
    coverage = None
    extra_report: dict[str, Any] = {}
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, target_latency)
        if kind == "latency":
            from graphprune.passes.latency_cost import register_latency_cost

            kind = register_latency_cost(analysis, loaded, progress=say)
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if scores is None:
            coverage = method_coverage(analysis, method)
            if strict_method:
                check_strict(coverage)
        if method in PLAN_METHODS and scores is None:
            say(f"searching the structure ({method}, calibration data through onnxruntime)")
            found = di_plan(analysis, target, kind, method_options, onnx_model=loaded.proto, progress=say)
            plan = Plan(found, kind, target, analysis.cost(kind), analysis.cost(kind, found))
        else:
            say(f"scoring channels ({method})")
            if scores is None:
                scores = score_classes(analysis, method, seed=seed, loaded=loaded, **method_options)
            protected = ignored_classes(analysis, list(ignore))
            if strategy == "sensitivity":
                from graphprune.passes.sensitivity import OnnxMaskedRunner, calibration_feeds, sensitivity_allocate

                say("sensitivity: measuring each group on calibration data")
                opts = _sensitivity_options(method_options)
                feeds = calibration_feeds(method_options.get("calib"), loaded.graph.inputs, opts["samples"])
                runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
                plan, sens = sensitivity_allocate(analysis, scores, runner, target=target, kind=kind,
                                                  round_to=round_to, protected=protected, progress=say, **opts)
                extra_report["sensitivity"] = sens.to_json()
            else:
                say("allocating the budget")
                plan = allocate(analysis, scores, target=target, kind=kind, strategy=strategy, round_to=round_to,
                                protected=protected)
    else:
        base = analysis.macs()
        plan = Plan(frozenset(removed), "macs", 1.0, base, analysis.macs(removed))
    times["plan_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewriting the graph")
    slim = rewrite_onnx(loaded.proto, analysis, plan.removed)
    times["rewrite_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("validating (checker, shape inference, onnxruntime)")
    feed = random_feed(loaded.proto, loaded.graph, seed)
    expected = [loaded.graph.shape(o) for o in loaded.graph.outputs]
    custom = custom_domains(loaded.proto)
    if custom:
        say(f"custom op domains {custom}: onnxruntime stage skipped")
        if any(s is None for s in expected):
            raise GraphpruneError(f"model uses custom op domains {custom} and its output shapes are not declared: "
                                  "cannot validate the pruned model")
    elif any(s is None for s in expected):
        try:
            expected = [tuple(o.shape) for o in run_onnx(loaded.proto, feed)]
        except Exception as exc:  # the input itself is broken; say so instead of a traceback
            raise GraphpruneError(f"input model fails to run in onnxruntime: {str(exc).splitlines()[0][:200]}") from None
    try:
        validate(slim, feed, expected, run=not custom)
    except GraphpruneError as exc:
        _blame_input(loaded.proto, feed, expected, run=not custom)
        raise exc from None
    times["validate_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    from graphprune.report.summary import build_report

    report = build_report(analysis, plan, method=method, strategy=strategy, round_to=round_to, times=times,
                          source=loaded.source, coverage=coverage)
    report.update(extra_report)
    report["validation"] = (["checker", "shape inference"] if custom
                            else ["checker", "shape inference", "onnxruntime run"])
    if custom:
        report["validation_note"] = f"onnxruntime run skipped: custom op domains {custom}"
    if plan.kind == "latency":
        from graphprune.passes.latency_cost import time_model

        say("measuring pruned latency")
        before = time_model(loaded.proto, feed, runs=20)
        after = time_model(slim, feed, runs=20)
        report["latency"] = {"backend": "onnxruntime", "threads": 1, "before_ms": before, "after_ms": after,
                             "ratio": after / before, "predicted_ratio": plan.achieved}
    return PruneResult(slim, analysis, plan, report)
