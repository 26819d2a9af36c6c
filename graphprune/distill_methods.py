"""The training-based methods (HFP, SSR/AULM, HBFP) on an ONNX model, driven by distillation instead of labels.

Why: those methods decide what to remove while they train, and a deployment engineer with an ONNX file
has neither labels nor a training pipeline. Here the graph itself is the trainable model
(graphprune.frontends.onnx_torch: every Conv/Gemm/MatMul/BatchNorm node is a layer module owning its
weight and bias, parameters keyed by their ONNX initializer names, which is what graphprune's analysis
binds), the original model is the teacher, and the task loss is the same per-output distillation loss
`graphprune.finetune` uses (KL on the logits, a Softmax output compared on its input). The method
code in graphprune.passes is unchanged: it sees an nn.Module with gate points and named parameters.

`train_plan` returns the graph with the method's trained weights (HFP's gates folded in, SSR's
zeroed groups, HBFP's masked filters) and the plan (removed channel classes of this graph's
analysis), meeting the FLOPs target exactly by the analysis' count; `graphprune.prune(model,
removed=plan, calib=..., recover="lsq")` then cuts it like any other plan, and `graphprune.finetune`
can spend the rest of a step budget. The method phase's steps are reported so a comparison can
charge them to the same budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from graphprune.errors import GraphpruneError

METHODS = ("hfp", "ssr", "hbfp")


@dataclass
class TrainedPlan:
    """A method's result on an ONNX model: trained weights in the original graph, and what to remove."""

    model: Any  # onnx.ModelProto: the original graph, names/opset/metadata kept, the method's weights
    removed: frozenset[int]  # channel classes of graphprune.analyze(model) to remove
    method: str
    steps: int  # distillation-loss steps the method trained for (charge them to the budget)
    flops: float  # kept FLOPs fraction of the plan (the analysis' count)
    params: float
    train_s: float
    log: dict[str, Any] = field(default_factory=dict)


def train_plan(original: Any, data: Any, method: str, target_flops: float, *,
               input_shape: dict[str, tuple[int, ...]] | None = None, steps: int = 400, epoch_steps: int = 40,
               batch_size: int = 64, lr: float = 5e-4, temperature: float = 1.0, device: str = "cpu",
               amp: bool | None = None, samples: int | None = None, preprocess: Any = None, seed: int = 0,
               method_options: dict[str, Any] | None = None, bar: bool = False,
               progress: Callable[[str], None] | None = None) -> TrainedPlan:
    """Run `method` ("hfp", "ssr" or "hbfp") on the ONNX model `original` for `steps` steps of label-free
    distillation from itself, on unlabeled `data` (anything --calib accepts; the held-out split of
    graphprune.finetune is left out here too), and return its plan for `target_flops`.

    `epoch_steps`: steps per "epoch" (a fixed random subset of the data, reshuffled each pass), the
    unit the methods schedule in (HBFP records its filter-norm history once per epoch).
    HBFP spends 40% of the steps recording the history, then two pairing rounds of 30% each.
    `method_options` override the method's config (HFPConfig, SSRConfig, HBFPConfig fields).
    """
    import torch

    from graphprune.api import analyze
    from graphprune.distill import _as_tuple, _load_data, _tensors, onnx_output_losses, outputs_loss
    from graphprune.frontends.onnx_frontend import load_onnx
    from graphprune.frontends.onnx_torch import OnnxModule, export_onnx
    from graphprune.passes.channels import from_analysis
    from graphprune.passes.training import TrainConfig

    if method not in METHODS:
        raise GraphpruneError(f"unknown training-based method {method!r}: choose from {list(METHODS)}")
    if not 0 < target_flops < 1:
        raise GraphpruneError(f"target_flops must be in (0, 1), got {target_flops}")
    if steps < 1 or epoch_steps < 1 or batch_size < 1:
        raise GraphpruneError("steps, epoch_steps and batch_size must be >= 1")
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    loaded = load_onnx(original, input_shape)
    names = list(loaded.graph.inputs)
    if len(names) != 1:
        raise GraphpruneError(f"training-based methods take a model with one input, this one has {len(names)}: {names}")
    say("reading data")
    fit, _hold = _load_data(data, loaded.graph, samples, preprocess)
    x_all = _tensors(fit, names)[0].float()
    analysis = analyze(loaded.proto, input_shape=input_shape)
    teacher = OnnxModule(loaded.proto).eval()
    student = OnnxModule(loaded.proto)
    for p in teacher.parameters():
        p.requires_grad_(False)
    losses = onnx_output_losses(loaded.proto, {})
    teacher.taps = student.taps = {e.tap for e in losses if e.tap}
    space = from_analysis(analysis, student)
    if not space.classes:
        raise GraphpruneError("the model has no prunable channels")
    if method == "hfp" and not space.gates:
        raise GraphpruneError("method hfp found no layer output to gate in this model")

    n = len(x_all)
    batch = min(batch_size, n)
    per_epoch = min(epoch_steps, -(-n // batch))
    gen = torch.Generator().manual_seed(seed)
    x = x_all[torch.randperm(n, generator=gen)[: per_epoch * batch]]
    y = torch.zeros(len(x), dtype=torch.long)  # never read: the task loss is distillation only
    epochs = max(1, steps // per_epoch)
    cuda = str(device).startswith("cuda")

    def distill_loss(s_out: Any, t_out: Any) -> Any:
        return outputs_loss(losses, _as_tuple(s_out), _as_tuple(t_out), student.captured, teacher.captured,
                            temperature)

    def cfg(ep: int, desc: str) -> TrainConfig:
        return TrainConfig(epochs=ep, lr=lr, weight_decay=0.0, batch_size=batch, optimizer="adamw", warmup=0.05,
                           label_free=True, distill_loss=distill_loss, augment=False, device=device,
                           amp=cuda if amp is None else bool(amp and cuda), grad_clip=5.0, progress=bar, desc=desc)

    say(f"{method}: {epochs * per_epoch} steps of label-free distillation ({epochs} epochs of {per_epoch}), "
        f"{len(space.classes)} channel classes")
    opts = dict(method_options or {})
    t = time.perf_counter()
    done = epochs * per_epoch
    if method == "hfp":
        from graphprune.passes.hfp import HFPConfig, hfp

        hcfg = HFPConfig({"macs": target_flops}, **opts)
        student, removed, log = hfp(student, space, x, y, hcfg, cfg(epochs, "hfp gates"), teacher, seed)
    elif method == "ssr":
        from graphprune.passes.ssr import SSRConfig, ssr

        # V/U updates every `every` steps; about 40 in the run (each one costs ~1 s on a 5,000-class network)
        scfg = SSRConfig(target_flops, **{"reg": "l20", "rho": 0.1, "every": max(5, done // 40), **opts})
        student, removed, log = ssr(student, space, x, y, scfg, cfg(epochs, "ssr aulm"), teacher, seed)
    else:
        from graphprune.passes.hbfp import HBFPConfig, NormHistory, hbfp
        from graphprune.passes.training import train

        rounds = int(opts.pop("rounds", 2))
        per_round = max(1, int(0.3 * epochs))
        hist_epochs = max(1, epochs - rounds * per_round)
        done = (hist_epochs + rounds * per_round) * per_epoch
        history = NormHistory(space)
        train(student, x, y, cfg(hist_epochs, "hbfp history"), teacher=teacher, after_epoch=history, seed=seed)
        bcfg = HBFPConfig(target_flops, **{"lam": 1.0, **opts, "rounds": rounds})
        student, removed, log = hbfp(student, space, x, y, history, bcfg, cfg(per_round, "hbfp pairs"),
                                     teacher=teacher, seed=seed)
    train_s = time.perf_counter() - t
    student = student.cpu().float()
    flops, params = space.ratio("macs", removed), space.ratio("params", removed)
    if flops > target_flops * (1 + 1e-9):
        raise GraphpruneError(f"method {method} could not reach the FLOPs target {target_flops:g} (plan keeps {flops:.4f})")
    trained = export_onnx(student, loaded.proto)
    log = {k: [float(v) for v in np.ravel(vals)] if isinstance(vals, (list, tuple)) else vals for k, vals in log.items()}
    say(f"{method}: plan removes {len(removed)} of {len(space.classes)} classes, FLOPs {flops:.4f} "
        f"({time.perf_counter() - t0:.0f}s)")
    return TrainedPlan(trained, frozenset(int(c) for c in removed), method, done, flops, params, train_s, log)
