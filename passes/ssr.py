"""Structured Sparsity Regularization with the AULM solver (Lin et al., "Toward compact ConvNets
via structure-sparsity regularized filter pruning", TNNLS 2019).

Objective: min_W L(W) + lambda * R(W), R a group-sparsity regulariser over filters (one group =
every "out" and "coupled" slice of a channel class: its filters, bias and BN affine, so a zero
group emits exactly zero):

    L2,1:  R(W) = sum_g w_g ||W_g||_2          (convex, shrinks)
    L2,0:  R(W) = sum_g w_g [||W_g||_2 != 0]   (counts groups)

AULM (Alternative Updating with Lagrange Multipliers) splits W = V and alternates, ADMM style,
with scaled multipliers U:

    W-step: a few SGD steps on L(W) + rho/2 ||W - V + U||^2
    V-step: V = prox_{lambda R / rho}(W + U)
              L2,1: V_g = max(0, 1 - lambda w_g / (rho ||Z_g||)) Z_g       (group soft threshold)
              L2,0: V_g = Z_g if ||Z_g||^2 > 2 lambda w_g / rho else 0      (group hard threshold)
    U-step: U = U + W - V

V's zero groups are exactly zero, so they can be removed; at the end W is replaced by V on the
removed groups. Choices (the paper tunes lambda by hand): the per-group weight is
w_g * mean norm of the group's layer, w_g = (share of the MACs the removal saves) ** cost_power
with cost_power 0 by default (layer-scale free; cost-aware weighting over-prunes residual streams, see docs/methods.md), and lambda is set at every V-step to the smallest value whose
prox zeroes enough groups to meet the cost target, so the zero set lands on the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, param_dict, plan_from_scores
from graphprune.passes.training import TrainConfig, train

GROUP_ROLES = ("out", "coupled")


@dataclass
class SSRConfig:
    target: float  # fraction of the cost kept
    kind: str = "macs"
    reg: str = "l21"  # "l21" or "l20"
    rho: float = 1e-2  # augmented-Lagrangian weight (per unit of squared group norm)
    every: int = 5  # W-steps (SGD steps) between V/U updates
    cost_power: float = 0.0  # w_g = (MACs share of the group's removal) ** cost_power; 0 = plain


def prox_l21(z: torch.Tensor, thresh: float) -> torch.Tensor:
    """Group soft threshold: shrink the whole group's norm by `thresh`, to exactly 0 below it."""
    n = float(z.norm())
    return z * max(0.0, 1.0 - thresh / n) if n > 0 else z * 0


def prox_l20(z: torch.Tensor, thresh_sq: float) -> torch.Tensor:
    """Group hard threshold: keep the group if ||z||^2 > thresh_sq, else exactly 0."""
    return z.clone() if float(z.pow(2).sum()) > thresh_sq else z * 0


class AULM:
    """Splitting variables and multipliers of one model's channel groups."""

    def __init__(self, model: nn.Module, space: ChannelSpace, cfg: SSRConfig) -> None:
        self.model, self.space, self.cfg = model, space, cfg
        self.params = param_dict(model)
        self.classes = [c for c in space.classes if any(s.role in GROUP_ROLES and s.param in self.params
                                                        for s in space.slices.get(c, []))]
        if cfg.cost_power == 0:  # plain weights: skip one cost evaluation per class (thousands on a real network)
            self.weight = {c: 1.0 for c in self.classes}
        else:
            base = space.cost(cfg.kind)
            saved = np.array([base - space.cost(cfg.kind, [c]) for c in self.classes])
            share = np.maximum(saved / max(saved.mean(), 1e-12), 1e-6) ** cfg.cost_power
            self.weight = {c: float(w) for c, w in zip(self.classes, share)}
        with torch.no_grad():
            w = self.flat(self._host())
        # V and U live on the host: the V-step goes class by class (thousands on a real network), and
        # on a GPU every one of those small ops and norms would be a launch and a synchronisation
        self.v = {c: t.clone() for c, t in w.items()}
        self.u = {c: torch.zeros_like(t) for c, t in w.items()}
        self.lam = 0.0
        self.zero: set[int] = set()
        self.scale: dict[int, float] = {}  # mean group norm of each class's group at the last V-step
        # the penalty in dense form: sum_p ||(P - T_p) * M_p||^2 with T = V - U scattered into
        # parameter shape, M the group-role entries (one op per parameter instead of per slice)
        self.mask: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        for c in self.classes:
            for sl in self._group_slices(c):
                p = self.params[sl.param]
                if sl.param not in self.mask:
                    self.mask[sl.param] = torch.zeros(p.shape, dtype=torch.bool)
                self.mask[sl.param].movedim(sl.axis, 0)[torch.as_tensor(sl.index)] = True
        self.mask = {n: m.to(self.params[n].device) for n, m in self.mask.items()}  # built on the host
        self._scatter()

    def _group_slices(self, c: int) -> list:
        return [sl for sl in self.space.slices.get(c, []) if sl.role in GROUP_ROLES and sl.param in self.params]

    @torch.no_grad()
    def _host(self) -> dict[str, torch.Tensor]:
        """The group parameters' current values on the CPU (no copy when they are there already)."""
        if not hasattr(self, "_names"):
            self._names = sorted({sl.param for c in self.classes for sl in self._group_slices(c)})
        return {n: self.params[n].detach().cpu() for n in self._names}

    @torch.no_grad()
    def _scatter(self) -> None:
        """T_p = V - U at every group-role entry, in the layout class_rows flattened it from
        (built on the host, then one copy per parameter to where the parameter lives)."""
        anchor = {n: torch.zeros(self.params[n].shape, dtype=self.params[n].dtype) for n in self.mask}
        for c in self.classes:
            flat = self.v[c] - self.u[c]
            pos = 0
            for sl in self._group_slices(c):
                t = anchor[sl.param].movedim(sl.axis, 0)
                k = len(sl.index)
                n = k * (t[0].numel() if t.ndim > 1 else 1)
                seg = flat[pos: pos + n].reshape(k, *t.shape[1:])
                t[torch.as_tensor(sl.index)] = seg
                pos += n
        self.anchor = {n: t.to(self.params[n].device) for n, t in anchor.items()}

    def flat(self, params: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """W_g: every group-role slice of the class, flattened and concatenated (differentiable when
        taken from the model's own parameters, the default)."""
        params = self.params if params is None else params
        return {c: torch.cat([r.reshape(-1) for r in self.space.class_rows(params, c, GROUP_ROLES)])
                for c in self.classes}

    def penalty(self, _model: nn.Module | None = None) -> torch.Tensor:
        """rho/2 sum_g ||W_g - V_g + U_g||^2 (the augmented-Lagrangian term of the W-step)."""
        total = 0.0
        for n, m in self.mask.items():
            total = total + ((self.params[n] - self.anchor[n]) * m).pow(2).sum()
        return 0.5 * self.cfg.rho * total

    def penalty_by_groups(self) -> torch.Tensor:
        """The same term summed group by group (reference for the dense form)."""
        w = self.flat()
        return 0.5 * self.cfg.rho * sum((w[c] - (self.v[c] - self.u[c]).to(w[c].device)).pow(2).sum()
                                        for c in self.classes)

    @torch.no_grad()
    def update(self) -> None:
        """V-step (prox, lambda set from the budget) then U-step.

        Groups are ranked by ||Z_g|| / w_g (L2,1) or ||Z_g||^2 / w_g (L2,0): the order in which a
        growing lambda zeroes them. lambda is the smallest value that zeroes a budget-meeting set;
        a group's last surviving class is never zeroed (plan_from_scores keeps one per group).
        """
        w = self.flat(self._host())
        z = {c: w[c] + self.u[c] for c in self.classes}
        power = 1 if self.cfg.reg == "l21" else 2
        score = self.scores(z, power)
        zero = plan_from_scores(self.space, score, {self.cfg.kind: self.cfg.target}) & set(self.classes)
        edge = max((score[c] for c in zero), default=0.0)
        rho = self.cfg.rho
        self.lam = rho * edge if power == 1 else rho * edge / 2
        for c in self.classes:
            if c in zero:
                self.v[c] = z[c] * 0
            elif power == 1:  # group soft threshold, lambda * w_g / rho = edge * w_g
                self.v[c] = prox_l21(z[c], min(edge * self.weight[c] * self.scale[c], 0.9 * float(z[c].norm())))
            else:  # group hard threshold keeps a surviving group unchanged
                self.v[c] = prox_l20(z[c], 0.0)
        for c in self.classes:
            self.u[c] += w[c] - self.v[c]
        self.zero = {c for c in self.classes if float(self.v[c].abs().max()) == 0.0}
        self._scatter()

    def scores(self, z: dict[int, torch.Tensor], power: int = 1) -> dict[int, float]:
        """||Z_g||^power / w_g with ||Z_g|| relative to its group's mean (layers of different scale)."""
        norms = {c: float(z[c].detach().norm()) for c in self.classes}
        out = {}
        for g in self.space.groups:
            cs = [c for c in g if c in norms]
            if not cs:
                continue
            mean = max(float(np.mean([norms[c] for c in cs])), 1e-12)
            for c in cs:
                self.scale[c] = mean
                out[c] = (norms[c] / mean) ** power / self.weight[c]
        return out

    @torch.no_grad()
    def project(self, classes: set[int]) -> None:
        """Write V into W for the given classes (their groups become exactly zero)."""
        for c in classes:
            for s in self.space.slices.get(c, []):
                if s.role in GROUP_ROLES and s.param in self.params:
                    p = self.params[s.param]
                    p.index_fill_(s.axis, torch.as_tensor(s.index, device=p.device), 0.0)


def ssr(model: nn.Module, space: ChannelSpace, x: torch.Tensor, y: torch.Tensor, cfg: SSRConfig,
        train_cfg: TrainConfig, teacher: nn.Module | None = None, seed: int = 0) -> tuple[nn.Module, frozenset[int], dict]:
    """AULM training, then the plan: V's zero groups (topped up by smallest norm if short)."""
    model.to(train_cfg.device)
    solver = AULM(model, space, cfg)
    log: dict[str, list[float]] = {"lambda": [], "zero_cost": []}

    def after_step(step: int) -> None:
        if step % cfg.every == 0:
            solver.update()
            log["lambda"].append(solver.lam)
            log["zero_cost"].append(space.ratio(cfg.kind, solver.zero))

    train(model, x, y, train_cfg, teacher=teacher, loss_term=solver.penalty, after_step=after_step, seed=seed)
    solver.update()
    w = solver.flat(solver._host())
    scores = solver.scores(w)
    scores.update({c: 0.0 for c in solver.zero})
    removed = plan_from_scores(space, scores, {cfg.kind: cfg.target})
    solver.project(set(removed))
    return model, removed, log
