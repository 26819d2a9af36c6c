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
from graphprune.frontends.external import has_mapped
from graphprune.frontends.onnx_frontend import LoadedModel, load_onnx
from graphprune.io import write_model_atomic
from graphprune.passes.allocate import Plan, allocate, ignored_classes
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import (PLAN_METHODS, TRAINING_METHODS, check_strict, di_plan, method_coverage,
                                       training_method_error)
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import custom_domains, masked_reference, random_feed, run_onnx, validate

Progress = Callable[[str], None]
# the activation-aware criterion (passes/act_importance.py); needs calibration data
ACT_METHODS = {"act", "activation"}


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


def resolve_round_to(analysis: Analysis, round_to: int | str, hardware: str, kind: str = "macs",
                     target: float | None = None, protected: set[int] | None = None) -> tuple[int | dict[int, int], dict]:
    """`round_to` as allocate() takes it, plus what the report says about it.

    "auto" looks the channel multiple for `hardware` up in the measured table
    (graphprune.backends.channel_table) and keeps every group at multiples of it; only when that
    cannot reach `target` are finer multiples used (passes.allocate.auto_multiples).
    """
    if round_to == "auto":
        from graphprune.backends.channel_table import channel_multiple
        from graphprune.passes.allocate import auto_multiples

        multiple = channel_multiple(hardware)
        multiples, fallback = auto_multiples(analysis, multiple, kind, target, protected)
        source = f"auto ({hardware} table{'; ' + fallback if fallback else ''})"
        return multiples, {"round_to": multiple, "round_to_source": source}
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
        raise GraphpruneError("--min-speedup needs the latency measurement (drop --no-measure; "
                              "models with custom op domains cannot be measured)")
    if latency["speedup"] < min_speedup:
        raise SpeedupNotMet(f"measured speed-up {latency['speedup']:.2f}x is below --min-speedup {min_speedup:g}x "
                            f"({latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms on {latency['backend']}); "
                            "nothing written")


def fit_latency_plan(original: onnx.ModelProto, analysis: Analysis, target: float,
                     allocate_at: Callable[[float], Plan], feed: dict, say: Progress) -> tuple[Plan, onnx.ModelProto, dict]:
    """Latency target: allocate, rewrite and time the slim model, re-planning until the measured
    ratio meets the target (passes.latency_cost.fit_to_measured). Returns plan, slim model and the
    latency record (with the fit history), so the measure step does not time it again."""
    from graphprune.backends.ort_backend import measure_speedup
    from graphprune.passes.latency_cost import fit_to_measured

    plan, slim, lat, history = fit_to_measured(
        target, allocate_at, lambda p: rewrite_onnx(original, analysis, p.removed),
        lambda m: measure_speedup(original, m, feed, budget_s=measure_budget_s(4.0), max_rounds=40, progress=say))
    lat["calibration"] = history
    return Plan(plan.removed, plan.kind, target, plan.base_cost, plan.cost, plan.kept), slim, lat


def measure_step(original: onnx.ModelProto, slim: onnx.ModelProto, feed: dict, report: dict[str, Any], plan: Plan,
                 lat: dict[str, Any] | None, say: Progress) -> dict[str, Any]:
    """Time original vs pruned on onnxruntime (interleaved, bounded by GRAPHPRUNE_MEASURE_S) so every
    prune states the speed-up it really gives next to the FLOPs reduction; for latency targets the
    measured ratio becomes "achieved" (the cost model's prediction is kept next to it).
    `lat` is a measurement already made (the latency fit); channel shapes decide the time, so one
    made before recovery changed the kept weights still holds."""
    if lat is None:
        from graphprune.backends.ort_backend import measure_speedup

        say("measuring original vs pruned latency on onnxruntime")
        lat = measure_speedup(original, slim, feed, budget_s=measure_budget_s(3.0), max_rounds=30, progress=say)
    lat["flops_speedup"] = 1.0 / report["macs"]["ratio"] if report["macs"]["ratio"] else float("inf")
    if plan.kind == "latency":
        lat["predicted_ratio"] = plan.achieved
        report["achieved"] = lat["ratio"]
        report["target_error"] = abs(lat["ratio"] - plan.target)
    return lat


def _blame_input(original: onnx.ModelProto, feed: dict, expected: list, run: bool = True) -> None:
    """A pruned model failed validation: if the input fails the same checks, say that instead."""
    try:
        validate(original, feed, expected, run=run)
    except GraphpruneError as exc:
        raise GraphpruneError(f"input model is invalid: {str(exc).replace('pruned model ', '', 1)}") from None


@dataclass
class CalibrationSplit:
    """Calibration samples used for statistics/fitting, and the held-out ones used to report agreement."""

    fit: Any
    holdout: Any

    def summary(self) -> dict[str, Any]:
        return {"samples": self.fit.n + self.holdout.n, "fit_samples": self.fit.n,
                "heldout_samples": self.holdout.n, "source": self.fit.source}


def prepare_calibration(calib: Any, graph: Any, samples: int | None = None, preprocess: Any = None,
                        labelled: bool = False) -> CalibrationSplit:
    """Load and validate calibration data for a model's IR graph and split off held-out samples."""
    from graphprune.calib import load_calibration, split_holdout

    if labelled and isinstance(calib, tuple) and len(calib) == 2:
        calib = calib[0]  # DI-style (inputs, labels): recovery only needs the inputs
    data = load_calibration(calib, graph, samples=samples, preprocess=preprocess)
    fit, hold = split_holdout(data)
    return CalibrationSplit(fit, hold)


def prune(
    model: Any,
    example_inputs: Any = None,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    method: str | None = None,
    strategy: str = "global",
    round_to: int | str = "auto",
    hardware: str | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    input_shape: dict[str, tuple[int, ...]] | None = None,
    scores: dict[int, float] | None = None,
    removed: set[int] | frozenset[int] | None = None,
    progress: Progress | None = None,
    allow_floor: bool = False,
    input_values: dict[str, float] | None = None,
    calib: Any = None,
    calib_samples: int | None = None,
    calib_preprocess: Any = None,
    recover: str | None = None,
    recover_options: dict[str, Any] | None = None,
    strict_method: bool = False,
    measure: bool = True,
    min_speedup: float | None = None,
    finetune_steps: int = 0,
    finetune_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> PruneResult:
    """Prune `model` to a cost target and return the validated slim model with a report.

    The report lists which groups `method` scored and which fell back to another criterion;
    `strict_method=True` makes any fallback an error instead.

    ONNX models (path or ModelProto) come back as a ModelProto; nn.Modules as a smaller nn.Module.
    Pass `scores` to use your own importance, or `removed` to apply an explicit plan.
    A target below what pruning can reach is an error unless `allow_floor` (then the floor is kept).
    `input_values` fixes inputs of the validation feed (e.g. a sample rate the model checks).

    Calibration (`calib`: arrays, a dict input name -> array, an iterable of batches, an .npz path or
    an image folder with `calib_preprocess`) makes pruning data-aware: the default method becomes
    "act" (activation-aware importance) and `recover` defaults to "lsq" (bias compensation, then
    layer-wise least-squares reconstruction); "bias" compensates only, "none" skips both.
    `recover_options` tunes RecoverOptions (ridge, lsq_samples, rows_per_sample).
    Without `calib` nothing changes: method defaults to "l1" and no recovery runs.
    round_to="auto" keeps channel counts at the multiples measured fast on `hardware` ("ort-cpu",
    the default for ONNX; "cuda-fp16", the default for nn.Modules when CUDA is available).
    ONNX results are timed against the original on onnxruntime (measure=False skips it);
    min_speedup turns a measured speed-up below it into SpeedupNotMet.

    `finetune_steps=N` then distils the original into the slim model for N steps on the `calib`
    inputs (graphprune.finetune; `finetune_options` are its FinetuneOptions); the report gains "finetune".
    """
    if finetune_steps:
        from graphprune.distill import prune_then_finetune

        # every argument of this call except the fine-tuning ones, forwarded unchanged
        args = {k: v for k, v in locals().items() if k not in ("model", "example_inputs", "finetune_steps",
                                                              "finetune_options", "method_options")}
        return prune_then_finetune(prune, model, example_inputs, finetune_steps, finetune_options,
                                   **args, **method_options)
    if method is None:
        method = "act" if calib is not None else "l1"
    if calib is None and (recover not in (None, "none") or method in ACT_METHODS):
        raise GraphpruneError(f"{'recover=' + recover if recover not in (None, 'none') else 'method act'} "
                              "needs calibration data (calib=... / --calib)")
    if _is_torch_module(model):
        from graphprune.torch_prune import prune_module

        if min_speedup is not None:
            raise GraphpruneError("min_speedup is measured on onnxruntime: export the module to ONNX first")
        if hardware is None:
            hardware = "cuda-fp16" if sys.modules["torch"].cuda.is_available() else "ort-cpu"
        return prune_module(
            model, example_inputs, target_flops=target_flops, target_params=target_params, method=method,
            strategy=strategy, round_to=round_to, hardware=hardware, ignore=ignore, seed=seed, scores=scores,
            removed=removed, progress=progress, calib=calib, calib_samples=calib_samples, recover=recover,
            recover_options=recover_options, strict_method=strict_method, allow_floor=allow_floor,
            **method_options,
        )
    if method in PLAN_METHODS and calib is not None:
        method_options["calib"] = calib
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

    data = None
    # DI reads its labelled (x, y) calibration itself; recovery data is only prepared when asked for
    if calib is not None and not (method in PLAN_METHODS and recover in (None, "none") and strategy != "sensitivity"):
        from graphprune.recovery import RecoverOptions

        t = time.perf_counter()
        say("reading calibration data")
        # DI's calibration is its labelled search data: it keeps its exact plain-pruning output unless asked
        opts = RecoverOptions(mode=recover or ("none" if method in PLAN_METHODS else "lsq"), seed=seed,
                              **(recover_options or {}))
        data = prepare_calibration(calib, loaded.graph, calib_samples, calib_preprocess, method in PLAN_METHODS)
        stats = None
        if method in ACT_METHODS or opts.mode != "none":
            from graphprune.recovery import collect_stats_onnx

            say("calibration statistics")
            stats = collect_stats_onnx(loaded.proto, analysis, data.fit, opts.progress)
        if method in ACT_METHODS and scores is None and removed is None:
            from graphprune.passes.act_importance import act_scores

            scores = act_scores(analysis, stats, centered=opts.mode != "none")
        times["calib_s"] = time.perf_counter() - t

    t = time.perf_counter()
    coverage = None
    extra_report: dict[str, Any] = {}
    protected = ignored_classes(analysis, list(ignore))
    custom = custom_domains(loaded.proto)
    feed = random_feed(loaded.proto, loaded.graph, seed, values=input_values)
    slim = lat = None
    if target_latency is not None and removed is None and (custom or not measure):
        raise GraphpruneError("--target-latency is checked by measuring: it cannot be combined with --no-measure "
                              "or custom op domains")
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, target_latency)
        if kind == "latency":
            from graphprune.passes.latency_cost import register_latency_cost

            kind = register_latency_cost(analysis, loaded, progress=say)
        multiples, round_info = resolve_round_to(analysis, round_to, hardware, kind, target, protected)
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

            def allocate_at(goal: float) -> Plan:
                return allocate(analysis, scores, target=goal, kind=kind, strategy=strategy, round_to=multiples,
                                protected=protected, allow_floor=allow_floor, cost_aware=kind == "latency")

            if strategy == "sensitivity":
                from graphprune.passes.sensitivity import OnnxMaskedRunner, calibration_feeds, sensitivity_allocate

                say("sensitivity: measuring each group on calibration data")
                sopts = _sensitivity_options(method_options)
                feeds = calibration_feeds(data.fit if data is not None else method_options.get("calib"),
                                          loaded.graph.inputs, sopts["samples"])
                runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
                plan, sens = sensitivity_allocate(analysis, scores, runner, target=target, kind=kind,
                                                  round_to=multiples, protected=protected, progress=say, **sopts)
                extra_report["sensitivity"] = sens.to_json()
            elif kind == "latency":
                say("allocating the budget, fitted to measured latency")
                plan, slim, lat = fit_latency_plan(loaded.proto, analysis, target, allocate_at, feed, say)
            else:
                say("allocating the budget")
                plan = allocate_at(target)
    else:
        round_info = resolve_round_to(analysis, round_to, hardware)[1]
        base = analysis.macs()
        plan = Plan(frozenset(removed), "macs", 1.0, base, analysis.macs(removed))
    times["plan_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewriting the graph")
    if slim is None:
        slim = rewrite_onnx(loaded.proto, analysis, plan.removed)
    times["rewrite_s"] = time.perf_counter() - t

    recovery_report = None
    if data is not None:
        from graphprune.recovery import recover_onnx

        t = time.perf_counter()
        if opts.mode != "none":
            say(f"recovering accuracy ({opts.mode})")
        slim, recovery_report = recover_onnx(loaded.proto, slim, analysis, plan.removed, data.fit, stats, opts, say)
        times["recover_s"] = time.perf_counter() - t

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
    # recovery changes kept weights on purpose: the slim model then no longer equals the masked original
    recovered = data is not None and opts.mode != "none"
    reference = None if custom or recovered else masked_reference(loaded.proto, analysis, plan.removed, feed)
    try:
        validate(slim, feed, expected, run=not custom, reference=reference)
    except GraphpruneError as exc:
        _blame_input(loaded.proto, feed, expected, run=not custom)
        raise exc from None
    times["validate_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    from graphprune.report.summary import build_report

    report = build_report(analysis, plan, method=method, strategy=strategy, round_to=round_info["round_to"],
                          times=times, source=loaded.source, coverage=coverage)
    report.update(extra_report)
    report["round_to_source"] = round_info["round_to_source"]
    report["validation"] = (["checker", "shape inference", "channel agreement"] if custom
                            else ["checker", "shape inference", "channel agreement",
                                  "onnxruntime run (optimised and unoptimised)"]
                            + (["equals masked original"] if reference is not None else []))
    if data is not None:
        from graphprune.recovery import holdout_agreement_onnx

        say("agreement on held-out calibration samples")
        recovery_report["agreement"] = holdout_agreement_onnx(loaded.proto, slim, data.holdout)
        report["calibration"] = data.summary()
        report["recovery"] = recovery_report
    if custom:
        report["validation_note"] = f"onnxruntime run skipped: custom op domains {custom}"
    if measure and not custom and has_mapped(loaded.proto) and lat is None:
        # timing runs both models side by side in onnxruntime, which copies (re-lays out) every
        # weight of each: that alone would exceed the ~2x memory budget of a memory-mapped model
        report["latency_note"] = "speed-up not measured: model weights are memory-mapped (large model); use bench"
    elif measure and not custom:
        report["latency"] = measure_step(loaded.proto, slim, feed, report, plan, lat, say)
    check_speedup(report.get("latency"), min_speedup)
    return PruneResult(slim, analysis, plan, report)
