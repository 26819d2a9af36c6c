"""Holistic Filter Pruning (HFP; Enderich, Timm & Burgard, WACV 2021).

Every channel class c gets a differentiable gate g_c = sigmoid(theta_c) that multiplies the
outputs of the layers producing it (after their BatchNorm). After each forward pass the model's
current size is computed from the gates with the same multilinear cost model the analysis uses,

    MACs(g) = sum_l base_l * mean(g over l's input channels) * mean(g over l's output channels)
    Params(g) likewise,

which equals the real count when every gate is 0 or 1. The loss adds, for each given target t_k,

    lambda * relu(Cost_k(g) / Cost_k(1) - t_k)        (distance to the target, one-sided;
                                                       lambda grows by dual ascent while over budget)
  + beta(step) * mean(g * (1 - g))                    (polarisation, ramped up over training)

so gradient descent trades task loss against size and decides how many channels each layer
keeps (the global allocation). At the end, classes are removed in increasing gate order until
*every* target is met (then the most valuable removed ones that still fit are given back), so
both params and MACs targets are hit to within one channel. The surviving gate values are folded
into the layers they scale, leaving an ordinary model plus a plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, channel_axis, plan_from_scores
from graphprune.passes.training import TrainConfig, train


@dataclass
class HFPConfig:
    targets: dict[str, float]  # e.g. {"macs": 0.4} or {"macs": 0.4, "params": 0.5}
    lam: float = 0.2  # initial weight of the distance-to-target penalty
    dual_lr: float | None = None  # lam grows by dual_lr * distance each step; None: 4 / steps
    beta: float = 0.5  # final weight of the polarisation term
    gate_lr: float | None = None  # None: 8 / steps, so a gate can travel ~8 logits within the budget
    init: float = 2.0  # initial logit (gate 0.88)
    min_keep_frac: float = 0.25  # the plan keeps at least this fraction of every group (see docs)


class Gates:
    """Per-class gates applied through forward hooks on the space's gate points."""

    def __init__(self, model: nn.Module, space: ChannelSpace, init: float = 3.0) -> None:
        if not space.gates:
            raise ValueError("HFP needs gate points (a ChannelSpace built with the nn.Module)")
        self.space = space
        dev = next(model.parameters()).device
        self.theta = nn.Parameter(torch.full((len(space.classes),), float(init), device=dev))
        self.group_index = torch.tensor([space.group_of[c] for c in space.classes], device=dev)
        self.n_groups = len(space.groups)
        modules = dict(model.named_modules())
        self.handles = [modules[g.module].register_forward_hook(self._hook(g.tensor)) for g in space.gates]

    def values(self) -> torch.Tensor:
        """sigmoid(theta) divided by its group's largest gate.

        Why the division: a BatchNorm downstream makes a layer blind to a common scale of all its
        input channels, so plain gates could shrink a whole group (e.g. a residual stream)
        "for free" and cut the cost model without removing anything. With the group maximum
        pinned to 1 that direction no longer lowers the cost; only removing channels does.
        """
        g = torch.sigmoid(self.theta)
        gmax = g.new_zeros(self.n_groups).scatter_reduce(0, self.group_index, g, "amax", include_self=False)
        return g / gmax[self.group_index]

    def full(self) -> torch.Tensor:
        g = self.values()
        return torch.cat([g, g.new_ones(1)])

    def _hook(self, tensor: str):
        axis = channel_axis(self.space.analysis, tensor)

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
            g = self.full()[self.space.slots(tensor, out.device)]
            shape = [1] * out.ndim
            shape[axis] = -1
            return out * g.view(shape).to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """Multiply each gate into the weight and bias of the module it scales, then unhook."""
        modules = dict(model.named_modules())
        full = self.full()
        for gp in self.space.gates:
            m = modules[gp.module]
            g = full[self.space.slots(gp.tensor).to(full.device)]
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is not None:
                    axis = getattr(m, "out_axis", 0) if name == "weight" else 0  # ONNX MatMul weights: the last
                    shape = [1] * p.ndim
                    shape[axis] = -1
                    p.mul_(g.view(shape).to(p.dtype))
        self.remove()


class SharedScaleAdam:
    """Adam with one second-moment scalar for the whole gate vector.

    Per-coordinate Adam would move every gate at the same speed and erase what decides the
    allocation (how much each gate's channel costs vs. how much the task needs it); one shared
    scale keeps the gradients' relative sizes while making the step size independent of the
    model's size.
    """

    def __init__(self, theta: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        self.theta, self.lr, self.betas = theta, lr, betas
        self.m = torch.zeros_like(theta)
        self.v = torch.zeros((), device=theta.device)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        g = self.theta.grad
        if g is None:
            return
        self.t += 1
        b1, b2 = self.betas
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).add_(g.pow(2).mean(), alpha=1 - b2)
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.theta.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-12))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.theta.grad = None


def budget_penalty(space: ChannelSpace, gates: torch.Tensor, targets: dict[str, float],
                   base: dict[str, float]) -> torch.Tensor:
    """Sum over kinds of relu(relative cost - target): zero once every target is met."""
    total = gates.new_zeros(())
    for kind, t in targets.items():
        total = total + torch.relu(space.soft_cost(kind, gates) / base[kind] - t)
    return total


def hfp(model: nn.Module, space: ChannelSpace, x: torch.Tensor, y: torch.Tensor, cfg: HFPConfig,
        train_cfg: TrainConfig, teacher: nn.Module | None = None, seed: int = 0) -> tuple[nn.Module, frozenset[int], dict]:
    """Train `model` with gates and the budget penalty, then return (model with gates folded,
    removed classes, log). The removed classes still have to be masked or physically pruned."""
    model.to(train_cfg.device)
    gates = Gates(model, space, cfg.init)
    base = {k: space.cost(k) for k in cfg.targets}
    steps_per_epoch = (len(y) + train_cfg.batch_size - 1) // train_cfg.batch_size
    total = max(1, train_cfg.epochs * steps_per_epoch)
    opt = SharedScaleAdam(gates.theta, lr=cfg.gate_lr or max(0.02, 8.0 / total))
    state = {"step": 0, "lam": cfg.lam}
    dual_lr = cfg.dual_lr if cfg.dual_lr is not None else 4.0 / total
    log: dict[str, list[float]] = {k: [] for k in cfg.targets}

    def loss_term(_m: nn.Module) -> torch.Tensor:
        g = gates.values()
        ramp = min(1.0, 2.0 * state["step"] / total)  # polarise during the second half
        dist = budget_penalty(space, g, cfg.targets, base)
        # dual ascent: the multiplier grows while the model is over budget (a Lagrangian view of
        # the target), so a small start is gentle on the task loss and the target is still reached
        state["lam"] = state["lam"] + dual_lr * float(dist.detach())
        return state["lam"] * dist + cfg.beta * ramp * (g * (1 - g)).mean()

    def after_step(step: int) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step
        if step % steps_per_epoch == 0:
            with torch.no_grad():
                g = gates.values().double().cpu()
                for k in cfg.targets:
                    log[k].append(float(space.soft_cost(k, g)) / base[k])

    try:
        train(model, x, y, train_cfg, teacher=teacher, loss_term=loss_term, after_step=after_step, seed=seed)
    except BaseException:
        gates.remove()
        raise
    g = gates.values().detach().cpu()
    scores = {c: float(g[i]) for i, c in enumerate(space.classes)}
    removed = plan_from_scores(space, scores, cfg.targets, min_keep_frac=cfg.min_keep_frac)
    gates.fold(model)
    log["final_gates_below_half"] = [float((g < 0.5).float().mean())]
    log["final_lambda"] = [state["lam"]]
    return model, removed, log
