"""nn.Modules at the pipeline's edge: trace with torch.fx, capture, rewrite real layers, validate, save."""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError
from graphprune.frontends.fx_frontend import TracedModule, analyze_traced, trace_module
from graphprune.passes.magnitude import CRITERIA
from graphprune.passes.methods import PLAN_METHODS
from graphprune.pipeline import PruneState
from graphprune.rewrite.torch_rewrite import mask_consumers_module, rewrite_module

TARGETS = ("macs", "params")


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


class _EvalMode:
    """Eval mode and no_grad for a forward pass, restoring every submodule's mode afterwards
    (validation and capture must not update BN statistics or draw dropout masks)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for m, mode in self.modes.items():
            m.training = mode


def example_inputs_from_shape(input_shape: dict[str, tuple[int, ...]], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random float inputs of the given shapes, in the order given (names are not used by a forward call)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for shape in input_shape.values())


def _shapes(inputs: Any) -> list[tuple[int, ...]]:
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    return [tuple(t.shape) for t in items if isinstance(t, torch.Tensor)]


class TorchAdapter:
    """Everything PyTorch-specific the pipeline needs.

    With inplace=False (default) the user's module is deep-copied first and never changed.
    """

    kind = "torch"
    targets = TARGETS

    def __init__(self, inplace: bool = False) -> None:
        self.inplace = inplace

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
        work = state.source if self.inplace else copy.deepcopy(state.source)
        traced = trace_module(work, inputs)
        state.lowered, state.graph = traced, traced.graph
        state.source_label = f"torch:{type(state.source).__name__}"

    def analyze(self, state: PruneState) -> Analysis:
        return analyze_traced(state.lowered)

    def criteria(self) -> dict[str, Callable[..., dict[int, float]]]:
        from graphprune.passes.taylor import taylor

        return {**CRITERIA, "taylor": taylor}

    def methods(self) -> list[str]:
        return sorted([*self.criteria(), *PLAN_METHODS])

    def score_context(self, state: PruneState) -> dict[str, Any]:
        return {"model": state.lowered.root}

    def search_context(self, state: PruneState) -> dict[str, Any]:
        return {"module": state.lowered.root.eval()}

    def latency_cost(self, state: PruneState) -> str:
        self.check_target("latency")
        return "latency"

    def capture(self, state: PruneState, tensors: Sequence[str], inputs: Any) -> dict[str, np.ndarray]:
        """Values of IR tensors on the ORIGINAL (unpruned) module, run through the traced graph in eval mode.

        `inputs`: a tensor/array (batch first) or a tuple of them; fed in chunks of 64 samples.
        """
        traced: TracedModule = state.lowered
        want: dict[torch.fx.Node, str] = {}
        for t in tensors:
            fx = traced.tensor_fx.get(t)
            if fx is None:
                raise GraphpruneError(f"cannot capture {t!r}: not a tensor of the traced module")
            want[fx] = t
        store: dict[str, list[np.ndarray]] = {t: [] for t in tensors}

        class _Recorder(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                out = super().run_node(n)
                if n in want:
                    store[want[n]].append(out.detach().float().cpu().numpy())
                return out

        items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        items = tuple(torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x) for x in items)
        items = tuple(x.float() if x.is_floating_point() else x for x in items)
        n = len(items[0])
        with _EvalMode(traced.gm):
            for i in range(0, n, 64):
                _Recorder(traced.gm).run(*(x[i: i + 64] for x in items))
        return {t: np.concatenate(v) for t, v in store.items()}

    def rewrite(self, state: PruneState) -> nn.Module:
        if state.param_updates:
            _apply_updates(state.lowered.root, state.param_updates)
        slim = rewrite_module(state.analysis, state.plan.removed)
        state.report["module_type"] = type(slim).__name__
        return slim

    def validate(self, state: PruneState) -> None:
        traced: TracedModule = state.lowered
        expected = [traced.graph.shapes.get(o) for o in traced.graph.outputs]
        try:
            with _EvalMode(state.slim):
                got = [tuple(t.shape) for t in _flat_tensors(state.slim(*traced.inputs))]
        except Exception as exc:
            raise GraphpruneError(f"internal error: the pruned module fails to run: {type(exc).__name__}: {exc}") from exc
        known = [s for s in expected if s is not None]
        if known != got[: len(known)]:
            raise GraphpruneError(f"internal error: pruned output shapes {got} differ from the original {expected}")

    def measure_latency(self, state: PruneState) -> dict[str, Any]:
        self.check_target("latency")
        return {}

    def reference(self, state: PruneState) -> nn.Module:
        source = state.source
        if state.param_updates:
            source = copy.deepcopy(source)
            _apply_updates(source, state.param_updates)
        return mask_consumers_module(source, state.analysis, state.plan.removed)

    def save(self, model: nn.Module, path: str | os.PathLike, overwrite: bool = True) -> None:
        from graphprune.torch_io import save

        save(model, path)


def _apply_updates(module: nn.Module, values: dict[str, np.ndarray]) -> None:
    """Copy recovered values into the module's parameters/buffers of the same name and shape."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name, value in values.items():
            t = tensors.get(name)
            if t is None:
                raise GraphpruneError(f"recovered parameter {name!r} is not a parameter of the module")
            v = torch.as_tensor(np.asarray(value), dtype=t.dtype, device=t.device)
            if v.shape != t.shape:
                raise GraphpruneError(f"recovered parameter {name!r} has shape {tuple(v.shape)}, "
                                      f"the module's is {tuple(t.shape)}")
            t.copy_(v)
