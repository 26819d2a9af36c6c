"""The training / fine-tuning loop the training-based passes share.

One loop (`optimize`) so every method and the distillation fine-tuning (graphprune.finetune) get
the same optimiser, schedule and budget: SGD with momentum or AdamW and a cosine schedule, optional knowledge distillation from the unpruned model (Hinton et al.: KL of
temperature-softened outputs), an optional extra loss term (a method's regulariser or budget
penalty) and a hook after each optimiser step (masks, ADMM updates). Data is a pair of tensors
batched on the target device, so the loop runs the same on a CPU or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossTerm = Callable[[nn.Module], torch.Tensor]
StepHook = Callable[[int], None]  # called with the global step after optimizer.step()
EpochHook = Callable[[int, nn.Module], None]
BatchLoss = Callable[[Any], torch.Tensor]
EvalHook = Callable[[int], float]  # held-out score at a step, higher is better


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    kd_alpha: float = 0.0  # weight of the distillation loss; 0 = off
    kd_temperature: float = 4.0
    augment: bool = True  # random shifts by up to 2 pixels (pad + crop)
    device: str = "cpu"
    progress: bool = True
    desc: str = "train"
    optimizer: str = "sgd"  # sgd (Nesterov momentum) or adamw
    label_free: bool = False  # task loss = distillation from the teacher only (no labels)
    amp: bool = False  # bf16 autocast (CUDA)
    grad_clip: float | None = None
    eval_every: int = 0  # steps between evaluate() calls; 0 = never
    patience: int = 0  # evaluations without improvement before stopping early; 0 = never stop
    min_delta: float = 0.0
    warmup: float = 0.0  # fraction of the steps with a linear learning-rate ramp before the cosine decay
    # (student output, teacher output) -> the distillation loss; None: KL of temperature-softened logits
    # along axis 1. graphprune.distill_methods passes the ONNX graph's own per-output losses here.
    distill_loss: Callable[[Any, Any], torch.Tensor] | None = None


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(y)
    order = torch.randperm(n, generator=generator, device="cpu").to(x.device) if shuffle else torch.arange(n, device=x.device)
    for i in range(0, n, batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]


def _shift(x: torch.Tensor, generator: torch.Generator | None, pad: int = 2) -> torch.Tensor:
    """Random translation by up to `pad` pixels (the CIFAR pad-and-crop augmentation)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return xp[:, :, dy: dy + h, dx: dx + w]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


@dataclass
class LoopResult:
    """What optimize() did: steps run, the loss curve, evaluations and whether it stopped early."""

    steps: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, score), higher is better
    best_step: int = 0
    best_score: float | None = None
    stopped_early: bool = False


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: choose sgd or adamw")


def optimize(model: nn.Module, cfg: TrainConfig, data: Iterable[Any], batch_loss: BatchLoss, total: int, *,
             loss_term: LossTerm | None = None, extra_params: list[dict] | None = None,
             after_step: StepHook | None = None, evaluate: EvalHook | None = None,
             postfix: Callable[[], dict[str, str]] | None = None) -> LoopResult:
    """The one optimisation loop: `batch_loss(batch)` on each item of `data` (at most `total` steps),
    the configured optimiser with a cosine schedule over `total`, bf16 autocast when `cfg.amp`.

    `evaluate(step) -> score` runs every `cfg.eval_every` steps and at the end; with `cfg.patience`
    the loop stops after that many evaluations without improvement and restores the best weights.
    """
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups += extra_params or []
    opt = make_optimizer(groups, cfg)
    total = max(1, total)
    warm = max(0, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm if warm else 1.0)
        * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, total) / total)).item()))
    dev_type = torch.device(cfg.device).type
    res = LoopResult()
    best_state: dict[str, torch.Tensor] | None = None
    bad = 0

    def check(step: int) -> bool:
        nonlocal best_state, bad
        score = float(evaluate(step))  # type: ignore[misc]
        res.evals.append((step, score))
        if res.best_score is None or score > res.best_score + cfg.min_delta:
            res.best_score, res.best_step, bad = score, step, 0
            if cfg.patience:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        return bool(cfg.patience) and bad >= cfg.patience

    with _bar(total, cfg.desc, cfg.progress) as bar:
        if evaluate is not None and cfg.eval_every:
            check(0)
        for batch in data:
            if res.steps >= total:
                break
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss = batch_loss(batch)
                if loss_term is not None:
                    loss = loss + loss_term(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            res.steps += 1
            if after_step is not None:
                after_step(res.steps)
            res.losses.append(float(loss.detach()))
            bar.update(1)
            shown = {"loss": f"{res.losses[-1]:.3f}", **(postfix() if postfix else {})}
            if evaluate is not None and cfg.eval_every and res.steps % cfg.eval_every == 0 and res.steps < total:
                stop = check(res.steps)
                shown["agree"] = f"{res.evals[-1][1]:.4f}"
                if stop:
                    res.stopped_early = True
                    break
            bar.set_postfix(shown, refresh=False)
    if evaluate is not None and cfg.eval_every and not res.stopped_early and (not res.evals or res.evals[-1][0] != res.steps):
        check(res.steps)
    if best_state is not None and res.best_step != res.steps:
        model.load_state_dict(best_state)
    return res


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *,
          teacher: nn.Module | None = None, loss_term: LossTerm | None = None,
          extra_params: list[dict] | None = None, after_step: StepHook | None = None,
          after_epoch: EpochHook | None = None, seed: int = 0) -> nn.Module:
    """Train `model` in place on (x, y) for `cfg.epochs`; returns it. `extra_params` are optimiser
    param groups (e.g. HFP gates with their own lr); `loss_term(model)` is added to the task loss.

    With `cfg.label_free` the labels are ignored and the task loss is distillation from `teacher`
    alone (KL for the logits), so the training-based methods can run on unlabeled data.
    """
    dev = torch.device(cfg.device)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
    if cfg.label_free and teacher is None:
        raise ValueError("label_free training needs a teacher")
    steps_per_epoch = (len(y) + cfg.batch_size - 1) // cfg.batch_size
    gen = torch.Generator().manual_seed(seed)

    def epochs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for epoch in range(cfg.epochs):
            model.train()
            for xb, yb in batches(x, y, cfg.batch_size, True, gen):
                if cfg.augment:
                    xb = _shift(xb, gen)
                yield xb, yb
            if after_epoch is not None:
                after_epoch(epoch, model)

    def batch_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        xb, yb = batch
        logits = model(xb)
        if teacher is None or (cfg.kd_alpha <= 0 and not cfg.label_free):
            return F.cross_entropy(logits, yb)
        with torch.no_grad():
            t_logits = teacher(xb)
        kd = cfg.distill_loss(logits, t_logits) if cfg.distill_loss else kd_loss(logits, t_logits, cfg.kd_temperature)
        if cfg.label_free:
            return kd
        return (1 - cfg.kd_alpha) * F.cross_entropy(logits, yb) + cfg.kd_alpha * kd

    total = cfg.epochs * steps_per_epoch
    stream = epochs()
    optimize(model, cfg, stream, batch_loss, total, loss_term=loss_term, extra_params=extra_params,
             after_step=after_step)
    for _ in stream:  # runs the last epoch's after_epoch hook
        pass
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str = "cpu", batch_size: int = 512) -> float:
    """Top-1 accuracy in eval mode."""
    dev = torch.device(device)
    model.to(dev).eval()
    correct = 0
    for xb, yb in batches(x.to(dev), y.to(dev), batch_size, False):
        correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / len(y)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, device: str = "cpu", batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics (after gates/masks changed the activations)."""
    dev = torch.device(device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.to(dev).train()
    for xb in x.to(dev).split(batch_size):
        model(xb)
    for m in bns:
        m.momentum = 0.1
    model.eval()
