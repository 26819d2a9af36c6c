"""prune() for nn.Modules: trace with torch.fx, analyse with the shared rule table, rewrite modules."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from graphprune.api import Progress, PruneResult, _parse_target, resolve_round_to, score_classes
from graphprune.errors import GraphpruneError
from graphprune.frontends.fx_frontend import TracedModule, analyze_traced, trace_module
from graphprune.passes.allocate import Plan, allocate, ignored_classes
from graphprune.passes.methods import PLAN_METHODS, TRAINING_METHODS, di_plan, training_method_error
from graphprune.report.summary import build_report
from graphprune.rewrite.torch_rewrite import rewrite_module


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Forward in eval mode without touching BN statistics, restoring each module's mode."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _flat_tensors(model(*inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode


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
    inplace: bool = False,
    **opts: Any,
) -> PruneResult:
    """Prune an nn.Module to a cost target; the result holds real, smaller layers.

    method "taylor" needs `batches` (an iterable) and `loss_fn(model, batch) -> loss`.
    With inplace=False (default) the user's module is left untouched. The returned module is the
    user's own class, or an fx GraphModule when functional code (view sizes, splits, channel
    shuffles) had to change.
    """
    say = progress or (lambda _msg: None)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    work = model if inplace else copy.deepcopy(model)
    say("tracing with torch.fx")
    traced = trace_module(work, example_inputs)
    times["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    say("analysing channel dependencies")
    analysis = analyze_traced(traced)
    times["analyze_s"] = time.perf_counter() - t

    t = time.perf_counter()
    multiples, round_info = resolve_round_to(analysis, round_to, hardware)
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, None)
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if method in PLAN_METHODS and scores is None:
            say(f"searching the structure ({method})")
            found = di_plan(analysis, target, kind, opts, module=work.eval())
            plan = Plan(found, kind, target, analysis.cost(kind), analysis.cost(kind, found))
        else:
            if scores is None:
                say(f"scoring channels ({method})")
                if method == "taylor":
                    from graphprune.passes.taylor import taylor

                    scores = taylor(analysis, model=work, **opts)
                else:
                    scores = score_classes(analysis, method, seed=seed, **opts)
            say("allocating the budget")
            plan = allocate(analysis, scores, target=target, kind=kind, strategy=strategy, round_to=multiples,
                            protected=ignored_classes(analysis, list(ignore)))
    else:
        plan = Plan(frozenset(removed), "macs", 1.0, analysis.macs(), analysis.macs(removed))
    times["plan_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("rewriting modules")
    slim = rewrite_module(analysis, plan.removed)
    times["rewrite_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("validating (forward pass on the example inputs)")
    _validate(slim, traced)
    times["validate_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    report = build_report(analysis, plan, method=method, strategy=strategy, round_to=round_info["round_to"],
                          times=times, source=f"torch:{type(model).__name__}")
    report["round_to_source"] = round_info["round_to_source"]
    report["module_type"] = type(slim).__name__
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
