"""nn.Modules at the pipeline's edge: capture with torch.fx (else torch.export), run, rewrite real
layers, validate, save."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable

import torch
from torch import nn

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError
from graphprune.frontends.fx_frontend import FX, TracedModule, analyze_traced, run_module, trace_module
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import method_coverage, methods_for
from graphprune.pipeline import PruneState
from graphprune.rewrite.torch_rewrite import rewrite_module


def example_inputs_from_shape(input_shape: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float inputs of the given shapes, in the order given (a forward call does not use names)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in input_shape.values())


def _shapes(inputs: Any) -> list[tuple[int, ...]]:
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [tuple(t.shape) for t in items if isinstance(t, torch.Tensor)]


class TorchAdapter:
    """Everything PyTorch-specific the pipeline needs.

    With inplace=False (default) the user's module is deep-copied first and never changed; with
    calibration data and inplace=True an untouched copy is kept for recovery to compare against.
    """

    kind = "torch"
    lower_message = "capturing the module (torch.fx, else torch.export)"
    rewrite_message = "rewriting modules"
    validate_message = "validating (forward pass on the example inputs)"
    search_note = ""
    measure_message = None

    def __init__(self, inplace: bool = False) -> None:
        self.inplace = inplace

    # -- load and analyse --------------------------------------------------------------------------
    def check_target(self, kind: str) -> None:
        if kind == "latency":
            raise GraphpruneError(
                "target_latency is measured with onnxruntime on ONNX models: export the module "
                "(torch.onnx.export(model, x, path, dynamo=False)) and prune the file, "
                "or give target_flops / target_params")

    def lower(self, state: PruneState) -> None:
        inputs, shape = state.example_inputs, state.options.input_shape
        if shape:
            if inputs is None:
                inputs = example_inputs_from_shape(shape, state.options.seed)
            elif list(map(tuple, shape.values())) != _shapes(inputs):
                raise GraphpruneError(f"input_shape {list(shape.values())} does not match the example inputs' "
                                      f"shapes {_shapes(inputs)}: give one of them")
        model = state.source
        work = model if self.inplace else copy.deepcopy(model)
        # recovery compares against the original, which an in-place rewrite would destroy
        if state.options.calibration is not None:
            state.original = copy.deepcopy(model) if self.inplace else model
        traced = trace_module(work, inputs)
        state.lowered, state.graph = traced, traced.graph
        state.source_label = f"torch:{type(model).__name__}"

    def analyze(self, state: PruneState) -> Analysis:
        mode = state.options.norm_channels
        if mode == "prune" and state.lowered.frontend != FX:
            # the kept-statistics reference re-traces the module with torch.fx, which failed here
            if any(n.op_type == "LayerNormalization" for n in state.graph.nodes):
                state.warnings.append("LayerNorm channels stay frozen (norm_channels 'freeze'): the module needed the "
                                      "torch.export fallback, and the masked reference of a pruned LayerNorm needs torch.fx")
            mode = "freeze"
        return analyze_traced(state.lowered, mode)

    # -- what the planning passes need ---------------------------------------------------------------
    def methods(self) -> list[str]:
        return methods_for(self.kind)

    def criteria(self) -> dict[str, Callable[..., dict[int, float]]]:
        from graphprune.passes.taylor import taylor

        return {**CRITERIA, "taylor": taylor}

    def score_context(self, state: PruneState) -> dict[str, Any]:
        return {"model": state.lowered.root} if state.options.method == "taylor" else {}

    def coverage(self, state: PruneState, method: str) -> dict[str, Any] | None:
        if method == "taylor":
            return None  # gradients reach every class the rewriter can slice
        return method_coverage(state.analysis, method, module=state.lowered.root)

    def search_context(self, state: PruneState) -> dict[str, Any]:
        return {"module": state.lowered.root}

    def latency_cost(self, state: PruneState) -> str:
        self.check_target("latency")
        return "latency"

    def masked_runner(self, state: PruneState, calib: Any, samples: int) -> Any:
        from graphprune.passes.sensitivity import TorchMaskedRunner, calibration_feeds

        names = list(state.graph.inputs)
        feeds = calibration_feeds(calib, names, samples, batch=samples)
        return TorchMaskedRunner(state.analysis, [tuple(torch.as_tensor(f[n]) for n in names) for f in feeds])

    def collect_stats(self, state: PruneState, calib: Any, progress: bool | None) -> Any:
        from graphprune.recovery_torch import collect_stats_module

        return collect_stats_module(state.original, state.analysis, calib, progress)

    # -- rewrite, recover ----------------------------------------------------------------------------
    def rewrite(self, state: PruneState) -> nn.Module:
        return rewrite_module(state.analysis, state.plan.removed)

    def recover(self, state: PruneState) -> dict[str, Any]:
        from graphprune.recovery_torch import recover_module

        return recover_module(state.original, state.slim, state.analysis, state.plan.removed, state.calibration.fit,
                              state.stats, state.recover_options, state.say)

    def agreement(self, state: PruneState, holdout: Any) -> dict[str, Any]:
        from graphprune.recovery_torch import holdout_agreement_module

        return holdout_agreement_module(state.original, state.slim, holdout)

    # -- check, measure --------------------------------------------------------------------------------
    def validate(self, state: PruneState) -> None:
        """A forward pass on the example inputs in eval mode must give the original output shapes."""
        traced: TracedModule = state.lowered
        expected = [traced.graph.shapes.get(o) for o in traced.graph.outputs]
        try:
            got = [tuple(t.shape) for t in run_module(state.slim, traced.inputs)]
        except Exception as exc:
            raise GraphpruneError(f"internal error: the pruned module fails to run: {type(exc).__name__}: {exc}") from exc
        known = [s for s in expected if s is not None]
        if known != got[: len(known)]:
            raise GraphpruneError(f"internal error: pruned output shapes {got} differ from the original {expected}")

    def fit_latency(self, state: PruneState, allocate_at: Callable[[float], Any]) -> Any:
        self.check_target("latency")

    def measure(self, state: PruneState) -> dict[str, Any] | None:
        """Modules are not timed here: the speed-up is measured on onnxruntime (export, then prune the file)."""
        return None

    def report_notes(self, state: PruneState) -> dict[str, Any]:
        traced: TracedModule = state.lowered
        notes: dict[str, Any] = {"module_type": type(state.slim).__name__, "frontend": traced.frontend}
        if traced.fallback_reason:
            notes["frontend_fallback_reason"] = f"torch.fx: {traced.fallback_reason}"
        return notes

    # -- the oracle and the file -----------------------------------------------------------------------
    def reference(self, state: PruneState) -> nn.Module:
        from graphprune.rewrite.torch_rewrite import mask_consumers_module

        return mask_consumers_module(state.source, state.analysis, state.plan.removed)

    def save(self, model: nn.Module, path: str | os.PathLike, overwrite: bool = True) -> None:
        from graphprune.torch_io import save

        save(model, path)


__all__ = ["TorchAdapter", "example_inputs_from_shape"]
