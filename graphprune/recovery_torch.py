"""Calibration-driven recovery for pruned nn.Modules: the model-kind side (TorchTarget) of the one
recovery driver in graphprune/recovery.py (run_recovery); activations come from hooks.

Consumers are the Conv/Linear modules behind the IR's consumer nodes (functional F.linear/F.conv
consumers are not hooked and keep plain pruning). Sequential reconstruction runs in *waves*: wave k
holds the consumers whose inputs depend on reconstructed consumers of waves < k only, so all
consumers of a wave are fitted from one forward pass of the original and of the pruned module, and
the result equals fitting them one by one in topological order (the ONNX driver's order).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from graphprune.analysis.groups import Analysis
from graphprune.calib import Calibration
from graphprune.capture import capture_module, module_inputs
from graphprune.frontends.fx_frontend import run_module
from graphprune.passes.act_importance import ChannelStats, stat_tensors
from graphprune.passes.consumers import Consumer, consumers
from graphprune.recovery import RecoverOptions, holdout_agreement, run_recovery


def consumer_modules(analysis: Analysis) -> dict[str, str]:
    """IR consumer node -> module path, for consumers that are module calls."""
    traced = getattr(analysis, "traced", None)
    out = {}
    for b in analysis.bindings:
        if b.role == "in" and traced is not None:
            fx = traced.origin.get(b.node)
            if fx is not None and fx.op == "call_module":
                out[b.node] = str(fx.target)
    return out


def _torch_attrs(module: nn.Module) -> dict:
    """A conv module's geometry in ONNX attribute terms, so the passes read one vocabulary."""
    nd = module.weight.ndim - 2
    pad = module.padding
    if isinstance(pad, str):
        auto = {"same": "SAME_UPPER", "valid": "VALID"}[pad]
        return {"auto_pad": auto, "strides": list(module.stride), "dilations": list(module.dilation)}
    return {"pads": list(pad) * 2, "strides": list(module.stride), "dilations": list(module.dilation),
            "group": module.groups, "kernel_shape": list(module.kernel_size[:nd])}


def collect_stats_module(model: nn.Module, analysis: Analysis, calib: Calibration,
                         progress: bool | None = None) -> ChannelStats:
    """Per-channel moments of every hooked consumer input of the original module."""
    axes = stat_tensors(analysis)
    mods = consumer_modules(analysis)
    by_tensor: dict[str, str] = {}
    for b in analysis.bindings:
        if b.role == "in" and b.node in mods:
            by_tensor.setdefault(b.tensor, mods[b.node])
    stats = ChannelStats({t: axes[t] for t in by_tensor})
    if by_tensor:
        capture_module(model, by_tensor, calib, stats.update, progress=progress, desc="calibration statistics")
    return stats


def _set_param(module: nn.Module, name: str, value: np.ndarray) -> None:
    old = getattr(module, name, None)
    ref = module.weight
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if isinstance(old, torch.Tensor):
        with torch.no_grad():
            old.data = t.reshape(old.shape).clone()
    else:
        setattr(module, name, nn.Parameter(t.clone(), requires_grad=ref.requires_grad))


def _waves(analysis: Analysis, cons: list[Consumer]) -> list[list[Consumer]]:
    """Group consumers by dependency depth among themselves (topological order inside a wave)."""
    graph = analysis.graph
    which = {c.node: c for c in cons}
    depth_of: dict[str, int] = {}  # tensor -> depth of the deepest consumer upstream of it
    node_depth: dict[str, int] = {}
    for node in graph.nodes:
        d = max((depth_of.get(t, 0) for t in node.inputs if t), default=0)
        if node.name in which:
            node_depth[node.name] = d
            d += 1
        for t in node.outputs:
            depth_of[t] = d
    waves: dict[int, list[Consumer]] = {}
    for c in cons:
        waves.setdefault(node_depth[c.node], []).append(c)
    return [waves[k] for k in sorted(waves)]


class TorchTarget:
    """Recovery on a pruned nn.Module: parameters set on its Conv/Linear modules, activations from
    forward pre-hooks, one forward pass of each model per wave of independent consumers."""

    def __init__(self, original: nn.Module, slim: nn.Module, mods: dict[str, str], calib: Calibration, n: int,
                 batch_size: int) -> None:
        self.original, self.slim, self.mods = original, slim, mods
        self.subs = dict(slim.named_modules())
        self.lsq, self.n, self.batch_size = calib.subset(0, n), n, batch_size

    def add_bias(self, c: Consumer, delta: np.ndarray) -> None:
        m = self.subs[self.mods[c.node]]
        cur = m.bias.detach().cpu().double().numpy() if m.bias is not None else 0.0
        _set_param(m, "bias", cur + delta)

    def set_fit(self, c: Consumer, weight: np.ndarray, bias: np.ndarray) -> None:
        m = self.subs[self.mods[c.node]]
        _set_param(m, "weight", weight)
        _set_param(m, "bias", bias)

    def waves(self, analysis: Analysis, cons: list[Consumer]) -> list[list[Consumer]]:
        return _waves(analysis, cons)

    def feed(self, wave: list[Consumer], fits: dict[str, Any], say: Callable[[str], None]) -> None:
        say(f"reconstructing {len(wave)} layer(s): {wave[0].node} ...")
        keys = {c.node: self.mods[c.node] for c in wave}
        for start, batch in zip(range(0, self.n, self.batch_size), self.lsq.batches(self.batch_size)):
            inputs = tuple(torch.as_tensor(batch[k]) for k in self.lsq.names)
            xo = module_inputs(self.original, keys, inputs)
            xp = module_inputs(self.slim, keys, inputs)
            for c in wave:
                fits[c.node].add(xp[c.node], xo[c.node], start)


def recover_module(original: nn.Module, slim: nn.Module, analysis: Analysis, removed: frozenset[int],
                   calib: Calibration, stats: ChannelStats | None, opts: RecoverOptions,
                   say: Callable[[str], None] = lambda _m: None, batch_size: int = 32) -> dict[str, Any]:
    """Compensate and/or reconstruct the consumers of `slim` in place; returns the recovery report."""
    if opts.mode == "none" or not removed:
        return {"mode": opts.mode}
    mods = consumer_modules(analysis)
    cons = [c for c in consumers(analysis, removed) if c.node in mods]
    subs_slim = dict(slim.named_modules())
    for c in cons:
        if c.kind == "conv":
            c.attrs = {**c.attrs, **_torch_attrs(subs_slim[mods[c.node]])}
    target = TorchTarget(original, slim, mods, calib, min(opts.lsq_samples, calib.n), batch_size)
    return run_recovery(analysis, cons, calib, stats, opts, target,
                        lambda: collect_stats_module(original, analysis, calib, opts.progress), say)


def holdout_agreement_module(original: nn.Module, slim: nn.Module, holdout: Calibration) -> dict[str, Any]:
    def runner(model: nn.Module) -> Callable[[Any], list[np.ndarray]]:
        def run(batch: Any) -> list[np.ndarray]:
            inputs = tuple(torch.as_tensor(batch[k]) for k in holdout.names)
            return [t.float().cpu().numpy() for t in run_module(model, inputs)]
        return run

    return holdout_agreement(holdout.batches(32), runner(original), runner(slim), holdout.n)
