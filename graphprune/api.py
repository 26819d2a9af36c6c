"""The public Python API. The CLI is a thin layer over these functions."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx

from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError, SpeedupNotMet
from graphprune.frontends.onnx_frontend import LoadedModel, load_onnx
from graphprune.io import write_model_atomic
from graphprune.passes.allocate import Plan, allocate, group_multiples, ignored_classes
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import PLAN_METHODS, TRAINING_METHODS, di_plan, training_method_error
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


def resolve_round_to(analysis: Analysis, round_to: int | str, hardware: str) -> tuple[int | dict[int, int], dict]:
    """`round_to` as allocate() takes it, plus what the report says about it.

    "auto" looks the channel multiple for `hardware` up in the measured table
    (graphprune.backends.channel_table) and halves it for groups too small for it.
    """
    if round_to == "auto":
        from graphprune.backends.channel_table import channel_multiple

        multiple = channel_multiple(hardware)
        return group_multiples(analysis, multiple), {"round_to": multiple, "round_to_source": f"auto ({hardware} table)"}
    try:
        value = int(round_to)
    except (TypeError, ValueError):
        raise GraphpruneError(f"--round-to must be a positive integer or 'auto', got {round_to!r}") from None
    if value < 1:
        raise GraphpruneError(f"--round-to must be >= 1, got {round_to}")
    return value, {"round_to": value, "round_to_source": "user"}


def measure_budget_s(default: float) -> float:
    """Seconds the speed-up measurement may take (at least 5 interleaved rounds still run);
    GRAPHPRUNE_MEASURE_S overrides the default, e.g. to keep CI fast or to measure longer."""
    value = os.environ.get("GRAPHPRUNE_MEASURE_S")
    try:
        return max(0.0, float(value)) if value else default
    except ValueError:
        raise GraphpruneError(f"GRAPHPRUNE_MEASURE_S must be a number of seconds, got {value!r}") from None


def check_speedup(latency: dict[str, Any] | None, min_speedup: float | None) -> None:
    """--min-speedup: a measured speed-up below the floor is a failure, not a warning."""
    if min_speedup is None:
        return
    if latency is None:
        raise GraphpruneError("--min-speedup needs the latency measurement (drop --no-measure)")
    if latency["speedup"] < min_speedup:
        raise SpeedupNotMet(f"measured speed-up {latency['speedup']:.2f}x is below --min-speedup {min_speedup:g}x "
                            f"({latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms on {latency['backend']}); "
                            "nothing written")


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
    round_to: int | str = "auto",
    hardware: str | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    input_shape: dict[str, tuple[int, ...]] | None = None,
    scores: dict[int, float] | None = None,
    removed: set[int] | frozenset[int] | None = None,
    progress: Progress | None = None,
    measure: bool = True,
    min_speedup: float | None = None,
    **method_options: Any,
) -> PruneResult:
    """Prune `model` to a cost target and return the validated slim model with a report.

    ONNX models (path or ModelProto) come back as a ModelProto; nn.Modules as a smaller nn.Module.
    Pass `scores` to use your own importance, or `removed` to apply an explicit plan.
    round_to="auto" keeps channel counts at the multiples measured fast on `hardware` ("ort-cpu",
    the default for ONNX; "cuda-fp16", the default for nn.Modules when CUDA is available).
    ONNX results are timed against the original on onnxruntime (measure=False skips it);
    min_speedup turns a measured speed-up below it into SpeedupNotMet.
    """
    if _is_torch_module(model):
        from graphprune.torch_prune import prune_module

        if min_speedup is not None:
            raise GraphpruneError("min_speedup is measured on onnxruntime: export the module to ONNX first")
        if hardware is None:
            hardware = "cuda-fp16" if sys.modules["torch"].cuda.is_available() else "ort-cpu"
        return prune_module(
            model, example_inputs, target_flops=target_flops, target_params=target_params, method=method,
            strategy=strategy, round_to=round_to, hardware=hardware, ignore=ignore, seed=seed, scores=scores,
            removed=removed, progress=progress, **method_options,
        )
    hardware = hardware or "ort-cpu"
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
    multiples, round_info = resolve_round_to(analysis, round_to, hardware)
    custom = custom_domains(loaded.proto)
    feed = random_feed(loaded.proto, loaded.graph, seed)
    slim = lat = None
    if target_latency is not None and removed is None and (custom or not measure):
        raise GraphpruneError("--target-latency is checked by measuring: it cannot be combined with --no-measure "
                              "or custom op domains")
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, target_latency)
        if kind == "latency":
            from graphprune.passes.latency_cost import register_latency_cost

            kind = register_latency_cost(analysis, loaded, progress=say)
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if method in PLAN_METHODS and scores is None:
            say(f"searching the structure ({method}, calibration data through onnxruntime)")
            found = di_plan(analysis, target, kind, method_options, onnx_model=loaded.proto)
            plan = Plan(found, kind, target, analysis.cost(kind), analysis.cost(kind, found))
        else:
            say(f"scoring channels ({method})")
            if scores is None:
                scores = score_classes(analysis, method, seed=seed, loaded=loaded, **method_options)
            say("allocating the budget")
            protected = ignored_classes(analysis, list(ignore))

            def allocate_at(goal: float) -> Plan:
                return allocate(analysis, scores, target=goal, kind=kind, strategy=strategy, round_to=multiples,
                                protected=protected, cost_aware=kind == "latency")

            if kind == "latency":
                from graphprune.backends.ort_backend import measure_speedup
                from graphprune.passes.latency_cost import fit_to_measured

                say("fitting the plan to measured latency")
                plan, slim, lat, history = fit_to_measured(
                    target, allocate_at, lambda p: rewrite_onnx(loaded.proto, analysis, p.removed),
                    lambda m: measure_speedup(loaded.proto, m, feed, budget_s=measure_budget_s(4.0), max_rounds=40,
                                              progress=say))
                lat["calibration"] = history
                plan = Plan(plan.removed, plan.kind, target, plan.base_cost, plan.cost, plan.kept)
            else:
                plan = allocate_at(target)
    else:
        base = analysis.macs()
        plan = Plan(frozenset(removed), "macs", 1.0, base, analysis.macs(removed))
    times["plan_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewriting the graph")
    if slim is None:
        slim = rewrite_onnx(loaded.proto, analysis, plan.removed)
    times["rewrite_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("validating (checker, shape inference, onnxruntime)")
    expected = [loaded.graph.shape(o) for o in loaded.graph.outputs]
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

    report = build_report(analysis, plan, method=method, strategy=strategy, round_to=round_info["round_to"],
                          times=times, source=loaded.source)
    report["round_to_source"] = round_info["round_to_source"]
    report["validation"] = (["checker", "shape inference"] if custom
                            else ["checker", "shape inference", "onnxruntime run"])
    if custom:
        report["validation_note"] = f"onnxruntime run skipped: custom op domains {custom}"
    if measure and not custom:
        from graphprune.backends.ort_backend import measure_speedup

        if lat is None:
            say("measuring original vs pruned latency on onnxruntime")
            lat = measure_speedup(loaded.proto, slim, feed, budget_s=measure_budget_s(3.0), max_rounds=30,
                                  progress=say)
        lat["flops_speedup"] = 1.0 / report["macs"]["ratio"] if report["macs"]["ratio"] else float("inf")
        report["latency"] = lat
        if plan.kind == "latency":
            # "achieved" is what was measured; the cost model's prediction is kept next to it
            lat["predicted_ratio"] = plan.achieved
            report["achieved"] = lat["ratio"]
            report["target_error"] = abs(lat["ratio"] - plan.target)
        check_speedup(lat, min_speedup)
    else:
        check_speedup(None, min_speedup)
    return PruneResult(slim, analysis, plan, report)
