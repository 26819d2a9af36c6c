"""prune() for nn.Modules: the same pipeline as ONNX (graphprune.api.prune) with the PyTorch adapter,
plus iterative pruning (the pipeline run `steps` times)."""
from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from graphprune.api import PruneResult, analyze, prune, score_classes
from graphprune.errors import GraphpruneError
from graphprune.pipeline import Progress

__all__ = ["prune_module", "prune_iterative", "score_classes"]


def prune_module(
    model: nn.Module,
    example_inputs: Any,
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
    inplace: bool = False,
    **opts: Any,
) -> PruneResult:
    """Prune an nn.Module to a cost target; the result holds real, smaller layers.

    method "taylor" needs `batches` (an iterable) and `loss_fn(model, batch) -> loss`.
    With inplace=False (default) the user's module is left untouched. The returned module is the
    user's own class, or an fx GraphModule when functional code (view sizes, splits, channel
    shuffles) had to change. target_latency is not available for modules (it is measured with
    onnxruntime): a clear error says so.
    """
    if not isinstance(model, nn.Module):
        raise GraphpruneError(f"prune_module needs an nn.Module, got {type(model).__name__}")
    return prune(model, example_inputs, target_flops=target_flops, target_params=target_params,
                 target_latency=target_latency, method=method, strategy=strategy, round_to=round_to, ignore=ignore,
                 seed=seed, input_shape=input_shape, scores=scores, removed=removed, progress=progress,
                 inplace=inplace, **opts)


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
    base = analyze(current, example_inputs).macs()
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
