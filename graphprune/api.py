"""The public Python API. The CLI is a thin layer over these functions.

`prune` only assembles: it checks the options, picks the adapter for the model kind, builds the
default pass list (graphprune.passes.stages.default_passes) or takes the caller's, and runs it
through one PassManager. ONNX models and nn.Modules go through the same code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from graphprune.adapters import adapter_for, is_torch_module
from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan
from graphprune.errors import GraphpruneError
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import PLAN_METHODS, TRAINING_METHODS, training_method_error
from graphprune.passes.stages import analysis_passes, default_passes, unknown_method_error
from graphprune.pipeline import Pass, PassManager, Progress, PruneOptions, PruneState

PassList = Sequence[Pass] | Callable[[list[Pass]], Sequence[Pass]]

# kept for callers of the old private name
_is_torch_module = is_torch_module


@dataclass
class PruneResult:
    """What prune() produced: the slim model, the plan behind it and a JSON-ready report."""

    model: Any
    analysis: Analysis
    plan: Plan
    report: dict[str, Any] = field(default_factory=dict)
    state: PruneState | None = field(default=None, repr=False, compare=False)

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        """Write the slim model atomically (ONNX: the .onnx file; nn.Module: graphprune.save's format)."""
        adapter = self.state.adapter if self.state is not None else adapter_for(self.model)
        adapter.save(self.model, path, overwrite=overwrite)

    def reference(self) -> Any:
        """The correctness oracle: the source model with the removed channels' consumers zeroed.

        Without recovery the slim model computes exactly what this model computes.
        """
        if self.state is None:
            raise GraphpruneError("this result carries no pipeline state to rebuild the reference from")
        return self.state.adapter.reference(self.state)


def _parse_target(target_flops: float | None, target_params: float | None, target_latency: float | None) -> tuple[str, float]:
    given = [(k, v) for k, v in (("macs", target_flops), ("params", target_params), ("latency", target_latency)) if v is not None]
    if len(given) != 1:
        raise GraphpruneError("give exactly one of target_flops, target_params, target_latency")
    kind, value = given[0]
    if not 0 < float(value) <= 1:
        raise GraphpruneError(f"target must be a fraction kept in (0, 1], got {value}")
    return kind, float(value)


def _state(model: Any, example_inputs: Any, options: PruneOptions, progress: Progress | None, adapter: Any) -> PruneState:
    state = PruneState(source=model, adapter=adapter, options=options, example_inputs=example_inputs)
    if progress is not None:
        state.progress = progress
    return state


def analyze(model: Any, example_inputs: Any = None, *, input_shape: dict[str, tuple[int, ...]] | None = None) -> Analysis:
    """Dependency analysis of an ONNX model (path or ModelProto) or an nn.Module (with example inputs)."""
    # the module itself is traced (no copy): the analysis refers to the caller's parameters
    state = _state(model, example_inputs, PruneOptions(input_shape=input_shape), None, adapter_for(model, inplace=True))
    return PassManager(analysis_passes(), instruments=[]).run(state).analysis


def inspect(model: Any, example_inputs: Any = None, *, input_shape: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Inspect an ONNX model (path or ModelProto) or an nn.Module (with example inputs)."""
    from graphprune.report.inspect import inspect_analysis

    if is_torch_module(model):
        source = type(model).__name__
    elif isinstance(model, str) or hasattr(model, "__fspath__"):
        source = str(model)
    else:
        source = None
    return inspect_analysis(analyze(model, example_inputs, input_shape=input_shape), source=source)


def score_classes(analysis: Analysis, method: str, *, seed: int = 0, **options: Any) -> dict[int, float]:
    """Importance scores for the weight-only criteria (data-driven methods live in their own passes)."""
    fn = CRITERIA.get(method)
    if fn is None:
        raise unknown_method_error(method, CRITERIA)
    return fn(analysis, seed=seed, **options)


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
    calib: Any = None,
    progress: Progress | None = None,
    passes: PassList | None = None,
    inplace: bool = False,
    **method_options: Any,
) -> PruneResult:
    """Prune `model` to a cost target and return the validated slim model with a report.

    ONNX models (path or ModelProto) come back as a ModelProto; nn.Modules as a smaller nn.Module
    (a copy unless inplace=True). Pass `scores` to use your own importance, or `removed` to apply an
    explicit plan. `calib` is calibration data ((inputs, labels) or an .npz path with x, y) for
    data-driven methods and recovery passes. `passes` replaces the pipeline: a list of Pass objects,
    or a function that receives the default list and returns the one to run.
    """
    adapter = adapter_for(model, inplace=inplace)
    kind = target = None
    if ignore and removed is not None:
        raise GraphpruneError("ignore patterns have no effect on an explicit plan (removed=): leave those classes out of it")
    if ignore and scores is None and method in PLAN_METHODS:
        raise GraphpruneError(f"method {method} searches the whole structure and cannot honour ignore patterns yet")
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, target_latency)
        adapter.check_target(kind)
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if scores is None and method not in adapter.methods():
            raise unknown_method_error(method, adapter.methods())
    options = PruneOptions(
        target_kind=kind, target=target, method=method, strategy=strategy, round_to=round_to, ignore=tuple(ignore),
        seed=seed, input_shape=input_shape, scores=scores,
        removed=frozenset(removed) if removed is not None else None, calibration=calib,
        method_options=dict(method_options),
    )
    pipeline = default_passes(options)
    if passes is not None:
        pipeline = list(passes(pipeline) if callable(passes) else passes)
    state = PassManager(pipeline).run(_state(model, example_inputs, options, progress, adapter))
    if state.slim is None or state.plan is None:
        raise GraphpruneError("the pass list produced no pruned model (it needs a plan and a rewrite pass)")
    return PruneResult(state.slim, state.analysis, state.plan, state.report, state)


__all__ = ["prune", "analyze", "inspect", "score_classes", "PruneResult", "PLAN_METHODS"]
