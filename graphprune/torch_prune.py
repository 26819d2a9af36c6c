"""prune() for nn.Modules: the same pipeline as ONNX files (graphprune.api.prune with the module
adapter), plus iterative pruning, which is that pipeline run k times."""
from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from graphprune.api import Progress, PruneResult, prune
from graphprune.errors import GraphpruneError
from graphprune.frontends.fx_frontend import analyze_traced, run_module, trace_module

# kept for callers of the old private name
_run = run_module


def prune_module(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    method: str | None = None,
    progress: Progress | None = None,
    inplace: bool = False,
    **kwargs: Any,
) -> PruneResult:
    """Prune an nn.Module to a cost target; the result holds real, smaller layers.

    Every option of graphprune.prune applies (targets, strategy, ignore, calibration and recovery,
    input_shape instead of example inputs). method "taylor" needs `batches` (an iterable) and
    `loss_fn(model, batch) -> loss`. With inplace=False (default) the user's module is left
    untouched. The returned module is the user's own class, or an fx GraphModule when functional
    code (view sizes, splits, channel shuffles) had to change.
    """
    if not isinstance(model, nn.Module):
        raise GraphpruneError(f"prune_module needs an nn.Module, got {type(model).__name__}")
    return prune(model, example_inputs, method=method, progress=progress, inplace=inplace, **kwargs)


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
