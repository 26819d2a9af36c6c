"""The training / fine-tuning loop the training-based passes share.

One loop so every method gets the same optimiser, schedule and budget: SGD with momentum and a
cosine schedule, optional knowledge distillation from the unpruned model (Hinton et al.: KL of
temperature-softened outputs), an optional extra loss term (a method's regulariser or budget
penalty) and a hook after each optimiser step (masks, ADMM updates). Data is a pair of tensors
batched on the target device, so the loop runs the same on a CPU or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LossTerm = Callable[[nn.Module], torch.Tensor]
StepHook = Callable[[int], None]  # called with the global step after optimizer.step()
EpochHook = Callable[[int, nn.Module], None]


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


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, *,
          teacher: nn.Module | None = None, loss_term: LossTerm | None = None,
          extra_params: list[dict] | None = None, after_step: StepHook | None = None,
          after_epoch: EpochHook | None = None, seed: int = 0) -> nn.Module:
    """Train `model` in place on (x, y); returns it. `extra_params` are optimiser param groups
    (e.g. HFP gates with their own lr); `loss_term(model)` is added to the task loss each step."""
    dev = torch.device(cfg.device)
    model.to(dev)
    x, y = x.to(dev), y.to(dev)
    if teacher is not None:
        teacher.to(dev).eval()
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups += extra_params or []
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    steps_per_epoch = (len(y) + cfg.batch_size - 1) // cfg.batch_size
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * min(s, total) / total)).item()))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    with _bar(total, cfg.desc, cfg.progress) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            for xb, yb in batches(x, y, cfg.batch_size, True, gen):
                if cfg.augment:
                    xb = _shift(xb, gen)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if teacher is not None and cfg.kd_alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd_loss(logits, t_logits, cfg.kd_temperature)
                if loss_term is not None:
                    loss = loss + loss_term(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if after_epoch is not None:
                after_epoch(epoch, model)
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
