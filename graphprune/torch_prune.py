"""prune() for nn.Modules: trace with torch.fx, analyse with the shared rule table, rewrite modules."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from graphprune.api import Progress, PruneResult, _parse_target, _sensitivity_options, resolve_round_to, score_classes
from graphprune.errors import GraphpruneError
from graphprune.frontends.fx_frontend import TracedModule, analyze_traced, eval_mode, trace_module
from graphprune.passes.allocate import Plan, allocate, ignored_classes
from graphprune.passes.methods import (PLAN_METHODS, TRAINING_METHODS, check_strict, di_plan, method_coverage,
                                       training_method_error)
from graphprune.report.summary import build_report
from graphprune.rewrite.torch_rewrite import rewrite_module


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Forward in eval mode without touching BN statistics, restoring each module's mode."""
    with eval_mode(model), torch.no_grad():
        return _flat_tensors(model(*inputs))


def _validate(slim: nn.Module, traced: TracedModule) -> None:
    expected = [traced.graph.shapes.get(o) for o in traced.graph.outputs]
    try:
        got = [tuple(t.shape) for t in _run(slim, traced.inputs)]
    except Exception as exc:
        raise GraphpruneError(f"internal error: the pruned module fails to run: {type(exc).__name__}: {exc}") from exc
    if [s for s in expected if s is not None] != got[: len([s for s in expected if s is not None])]:
        raise GraphpruneError(f"internal error: pruned output shapes {got} differ from the original {expected}")


def prune_module(
    model: nn.Module,
    example_inputs: Any,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    method: str = "l1",
    strategy: str = "global",
    round_to: int | str = "auto",
    hardware: str = "cuda-fp16",
    ignore: tuple[str, ...] | list[str] = (),
    seed: int = 0,
    scores: dict[int, float] | None = None,
    removed: set[int] | frozenset[int] | None = None,
    progress: Progress | None = None,
    strict_method: bool = False,
    allow_floor: bool = False,
    inplace: bool = False,
    calib: Any = None,
    calib_samples: int | None = None,
    recover: str | None = None,
    recover_options: dict[str, Any] | None = None,
    **opts: Any,
) -> PruneResult:
    """Prune an nn.Module to a cost target; the result holds real, smaller layers.

    method "taylor" needs `batches` (an iterable) and `loss_fn(model, batch) -> loss`.
    With inplace=False (default) the user's module is left untouched. The returned module is the
    user's own class, or an fx GraphModule when functional code (view sizes, splits, channel
    shuffles) had to change.
    """
    say = progress or (lambda _msg: None)
    if method in PLAN_METHODS and calib is not None:
        opts["calib"] = calib
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    # recovery compares against the original, which an in-place rewrite would destroy
    original = (copy.deepcopy(model) if inplace else model) if calib is not None else None
    say("capturing the module (torch.fx, else torch.export)")
    traced = trace_module(work, example_inputs)
    times["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    say("analysing channel dependencies")
    analysis = analyze_traced(traced)
    times["analyze_s"] = time.perf_counter() - t

    data = stats = None
    # DI reads its labelled (x, y) calibration itself; recovery data is only prepared when asked for
    if calib is not None and not (method in PLAN_METHODS and recover in (None, "none") and strategy != "sensitivity"):
        from graphprune.api import ACT_METHODS, prepare_calibration
        from graphprune.recovery import RecoverOptions
        from graphprune.recovery_torch import collect_stats_module

        t = time.perf_counter()
        rec_opts = RecoverOptions(mode=recover or ("none" if method in PLAN_METHODS else "lsq"), seed=seed,
                                  **(recover_options or {}))
        data = prepare_calibration(calib, analysis.graph, calib_samples, labelled=method in PLAN_METHODS)
        if method in ACT_METHODS or rec_opts.mode != "none":
            say("calibration statistics")
            stats = collect_stats_module(original, analysis, data.fit, rec_opts.progress)
        if method in ACT_METHODS and scores is None and removed is None:
            from graphprune.passes.act_importance import act_scores

            scores = act_scores(analysis, stats, centered=rec_opts.mode != "none")
        times["calib_s"] = time.perf_counter() - t

    t = time.perf_counter()
    coverage = None
    extra_report: dict[str, Any] = {}
    protected = ignored_classes(analysis, list(ignore))
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, None)
        multiples, round_info = resolve_round_to(analysis, round_to, hardware, kind, target, protected)
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if scores is None and method != "taylor":
            coverage = method_coverage(analysis, method, module=work)
            if strict_method:
                check_strict(coverage)
        if method in PLAN_METHODS and scores is None:
            say(f"searching the structure ({method})")
            found = di_plan(analysis, target, kind, opts, module=work.eval(), progress=say)
            plan = Plan(found, kind, target, analysis.cost(kind), analysis.cost(kind, found))
        else:
            if scores is None:
                say(f"scoring channels ({method})")
                if method == "taylor":
                    from graphprune.passes.taylor import taylor

                    scores = taylor(analysis, model=work, **opts)
                else:
                    scores = score_classes(analysis, method, seed=seed, **opts)
            if strategy == "sensitivity":
                from graphprune.passes.sensitivity import TorchMaskedRunner, calibration_feeds, sensitivity_allocate

                say("sensitivity: measuring each group on calibration data")
                sopts = _sensitivity_options(opts)
                names = list(analysis.graph.inputs)
                feeds = calibration_feeds(data.fit if data is not None else opts.get("calib"), names,
                                          sopts["samples"], batch=sopts["samples"])
                runner = TorchMaskedRunner(analysis, [tuple(torch.as_tensor(f[n]) for n in names) for f in feeds])
                plan, sens = sensitivity_allocate(analysis, scores, runner, target=target, kind=kind,
                                                  round_to=multiples, protected=protected, progress=say, **sopts)
                extra_report["sensitivity"] = sens.to_json()
            else:
                say("allocating the budget")
                plan = allocate(analysis, scores, target=target, kind=kind, strategy=strategy, round_to=multiples,
                                protected=protected, allow_floor=allow_floor)
    else:
        round_info = resolve_round_to(analysis, round_to, hardware)[1]
        plan = Plan(frozenset(removed), "macs", 1.0, analysis.macs(), analysis.macs(removed))
    times["plan_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewriting modules")
    slim = rewrite_module(analysis, plan.removed)
    times["rewrite_s"] = time.perf_counter() - t

    recovery_report = None
    if data is not None:
        from graphprune.recovery_torch import recover_module

        t = time.perf_counter()
        recovery_report = recover_module(original, slim, analysis, plan.removed, data.fit, stats, rec_opts, say)
        times["recover_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("validating (forward pass on the example inputs)")
    _validate(slim, traced)
    times["validate_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    report = build_report(analysis, plan, method=method, strategy=strategy, round_to=round_info["round_to"],
                          times=times, source=f"torch:{type(model).__name__}", coverage=coverage)
    report.update(extra_report)
    report["round_to_source"] = round_info["round_to_source"]
    report["module_type"] = type(slim).__name__
    report["frontend"] = traced.frontend
    if traced.fallback_reason:
        report["frontend_fallback_reason"] = f"torch.fx: {traced.fallback_reason}"
    if data is not None:
        from graphprune.recovery_torch import holdout_agreement_module

        recovery_report["agreement"] = holdout_agreement_module(original, slim, data.holdout)
        report["calibration"] = data.summary()
        report["recovery"] = recovery_report
    return PruneResult(slim, analysis, plan, report)


def prune_iterative(
    model: nn.Module,
    example_inputs: Any,
    target_flops: float,
    *,
    steps: int = 3,
    callback: Callable[[int, nn.Module], Any] | None = None,
    inplace: bool = False,
    **kwargs: Any,
) -> PruneResult:
    """Prune in `steps` geometric steps to `target_flops`, calling `callback(step, model)` after each
    (e.g. to fine-tune) so later steps score the recovered weights."""
    if steps < 1:
        raise GraphpruneError("steps must be >= 1")
    current = model if inplace else copy.deepcopy(model)
    base = analyze_traced(trace_module(current, example_inputs)).macs()
    result = None
    history = []
    for step in range(1, steps + 1):
        now = result.analysis.macs(result.plan.removed) if result is not None else base
        goal = base * target_flops ** (step / steps)
        frac = min(1.0, goal / now)
        result = prune_module(current, example_inputs, target_flops=frac, inplace=True, **kwargs)
        current = result.model
        history.append({"step": step, "macs_ratio": result.analysis.macs(result.plan.removed) / base})
        if callback is not None:
            callback(step, current)
    result.report["iterative"] = {"steps": history, "macs_ratio": history[-1]["macs_ratio"]}
    return result
