"""The public Python API. The CLI is a thin layer over these functions.

`prune` only assembles: it checks the options, picks the adapter for the model kind, builds the
default pass list (graphprune.passes.stages.default_passes) or takes the caller's, and runs it
through one PassManager. ONNX models and nn.Modules go through the same code.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from graphprune.adapters import adapter_for, is_torch_module
from graphprune.analysis.context import DEFAULT_NORM_CHANNELS, NORM_CHANNELS
from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan
from graphprune.calib import CalibrationSplit, prepare_calibration
from graphprune.errors import GraphpruneError
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.measure import check_speedup
from graphprune.passes.methods import ACT_METHODS, PLAN_METHODS, TRAINING_METHODS, check_method, training_method_error
from graphprune.passes.stages import analysis_passes, default_passes
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

        Without recovery the slim model computes exactly what this model computes; with recovery
        (report['recovery']['mode'] other than 'none') the kept weights were refitted on purpose.
        """
        if self.state is None:
            raise GraphpruneError("this result carries no pipeline state to rebuild the reference from")
        return self.state.adapter.reference(self.state)


def _state(model: Any, example_inputs: Any, options: PruneOptions, progress: Progress | None, adapter: Any) -> PruneState:
    state = PruneState(source=model, adapter=adapter, options=options, example_inputs=example_inputs)
    if progress is not None:
        state.progress = progress
    return state


def analyze(model: Any, example_inputs: Any = None, *, input_shape: dict[str, tuple[int, ...]] | None = None,
            norm_channels: str = DEFAULT_NORM_CHANNELS) -> Analysis:
    """Dependency analysis of an ONNX model (path or ModelProto) or an nn.Module (with example inputs).
    `norm_channels` as in prune(): a plan (removed=) built on this analysis needs the same value there."""
    if norm_channels not in NORM_CHANNELS:
        raise GraphpruneError(f"norm_channels must be one of {', '.join(NORM_CHANNELS)}, not {norm_channels!r}")
    # the module itself is captured (no copy): the analysis refers to the caller's parameters
    state = _state(model, example_inputs, PruneOptions(input_shape=input_shape, norm_channels=norm_channels), None,
                   adapter_for(model, inplace=True))
    return PassManager(analysis_passes(), instruments=[]).run(state).analysis


def inspect(model: Any, example_inputs: Any = None, *, input_shape: dict[str, tuple[int, ...]] | None = None,
            norm_channels: str = DEFAULT_NORM_CHANNELS) -> dict[str, Any]:
    """Inspect an ONNX model (path or ModelProto) or an nn.Module (with example inputs)."""
    from graphprune.report.inspect import inspect_analysis

    if is_torch_module(model):
        source = type(model).__name__
    elif isinstance(model, str) or hasattr(model, "__fspath__"):
        source = str(model)
    else:
        source = None
    return inspect_analysis(analyze(model, example_inputs, input_shape=input_shape, norm_channels=norm_channels),
                            source=source)


def score_classes(analysis: Analysis, method: str, *, seed: int = 0, **options: Any) -> dict[int, float]:
    """Importance scores for the weight-only criteria (data-driven methods live in their own passes)."""
    fn = CRITERIA.get(method)
    if fn is None:
        raise GraphpruneError(f"unknown or unsupported method {method!r} for this model; choose from {sorted(CRITERIA)}")
    return fn(analysis, seed=seed, **options)


def _parse_target(target_flops: float | None, target_params: float | None, target_latency: float | None) -> tuple[str, float]:
    given = [(k, v) for k, v in (("macs", target_flops), ("params", target_params), ("latency", target_latency)) if v is not None]
    if len(given) != 1:
        raise GraphpruneError("give exactly one of target_flops, target_params, target_latency")
    kind, value = given[0]
    if not 0 < float(value) <= 1:
        raise GraphpruneError(f"target must be a fraction kept in (0, 1], got {value}")
    return kind, float(value)


def prune(
    model: Any,
    example_inputs: Any = None,
    *,
    target_flops: float | None = None,
    target_params: float | None = None,
    target_latency: float | None = None,
    method: str | None = None,
    strategy: str = "speed",
    round_to: int | str = "auto",
    hardware: str | None = None,
    ignore: tuple[str, ...] | list[str] = (),
    norm_channels: str = DEFAULT_NORM_CHANNELS,
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
    inplace: bool = False,
    passes: PassList | None = None,
    finetune_steps: int = 0,
    finetune_options: dict[str, Any] | None = None,
    **method_options: Any,
) -> PruneResult:
    """Prune `model` to a cost target and return the validated slim model with a report.

    ONNX models (path or ModelProto) come back as a ModelProto; nn.Modules as a smaller nn.Module
    (a copy unless inplace=True). Pass `scores` to use your own importance, or `removed` to apply an
    explicit plan. A target below what pruning can reach is an error unless `allow_floor` (then the
    floor is kept). `input_values` fixes inputs of the validation feed (e.g. a sample rate the model
    checks). The report lists which groups `method` scored and which fell back to another criterion;
    `strict_method=True` makes any fallback an error instead.

    Calibration (`calib`: arrays, a dict input name -> array, an iterable of batches, an .npz path or
    an image folder with `calib_preprocess`) makes pruning data-aware: the default method becomes
    "act" (activation-aware importance) and `recover` defaults to "lsq" (bias compensation, then
    layer-wise least-squares reconstruction); "bias" compensates only, "none" skips both.
    `recover_options` tunes RecoverOptions (ridge, lsq_samples, rows_per_sample). For method "di",
    `calib` is (inputs, labels) or an .npz with x, y. Without `calib` method defaults to "l1" and no
    recovery runs.

    norm_channels="prune" (the default) also prunes channels a LayerNorm normalises over (ConvNeXt's
    residual stream); such a LayerNorm then takes its statistics over the kept channels, and the
    masked reference the result is validated against does the same (docs/methods.md, "LayerNorm-coupled
    channels"). "freeze" keeps those channels whole: the pruned model then equals the original with
    the removed channels' consumers zeroed, LayerNorms untouched.

    round_to="auto" keeps channel counts at the multiples measured fast on `hardware` ("ort-cpu",
    the default for ONNX; "cuda-fp16", the default for nn.Modules when CUDA is available).
    ONNX results are timed against the original on onnxruntime (measure=False skips it);
    min_speedup turns a measured speed-up below it into SpeedupNotMet.

    `passes` replaces the pipeline: a list of Pass objects, or a function that receives the default
    list (graphprune.passes.stages.default_passes) and returns the one to run.

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
    if ignore and removed is not None:
        raise GraphpruneError("ignore patterns have no effect on an explicit plan (removed=): leave those classes out of it")
    if ignore and scores is None and method in PLAN_METHODS:
        raise GraphpruneError(f"method {method} searches the whole structure and cannot honour ignore patterns yet")
    if norm_channels not in NORM_CHANNELS:
        raise GraphpruneError(f"norm_channels must be one of {', '.join(NORM_CHANNELS)}, not {norm_channels!r}")
    adapter = adapter_for(model, inplace=inplace)
    if adapter.kind == "torch":
        if min_speedup is not None:
            raise GraphpruneError("min_speedup is measured on onnxruntime: export the module to ONNX first")
        if hardware is None:
            hardware = "cuda-fp16" if sys.modules["torch"].cuda.is_available() else "ort-cpu"
    hardware = hardware or "ort-cpu"
    if not measure and min_speedup is not None:
        check_speedup(None, min_speedup)  # fails before any work: nothing would be measured
    kind = target = None
    if removed is None:
        kind, target = _parse_target(target_flops, target_params, target_latency)
        adapter.check_target(kind)
        if kind == "latency" and not measure:
            raise GraphpruneError("--target-latency is checked by measuring: it cannot be combined with --no-measure "
                                  "or custom op domains")
        if method in TRAINING_METHODS:
            raise training_method_error(method)
        if scores is None:
            check_method(method, adapter.kind)
    options = PruneOptions(
        target_kind=kind, target=target, method=method, strategy=strategy, round_to=round_to, hardware=hardware,
        measure=measure, min_speedup=min_speedup, ignore=tuple(ignore), norm_channels=norm_channels,
        seed=seed, input_shape=input_shape, scores=scores, removed=frozenset(removed) if removed is not None else None,
        allow_floor=allow_floor, strict_method=strict_method, input_values=input_values, calibration=calib,
        calib_samples=calib_samples, calib_preprocess=calib_preprocess, recover=recover,
        recover_options=dict(recover_options or {}), method_options=dict(method_options),
    )
    pipeline = default_passes(options)
    if passes is not None:
        pipeline = list(passes(pipeline) if callable(passes) else passes)
    state = PassManager(pipeline).run(_state(model, example_inputs, options, progress, adapter))
    if state.slim is None or state.plan is None:
        raise GraphpruneError("the pass list produced no pruned model (it needs a plan and a rewrite pass)")
    return PruneResult(state.slim, state.analysis, state.plan, state.report, state)


__all__ = ["prune", "analyze", "inspect", "score_classes", "prepare_calibration", "CalibrationSplit", "PruneResult",
           "PLAN_METHODS", "ACT_METHODS"]
