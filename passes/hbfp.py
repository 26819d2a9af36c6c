"""History-Based Filter Pruning (HBFP; Basha, Farazuddin, Pulabaigari, Dubey & Mukherjee,
"Deep model compression based on the training history", Neurocomputing 2024).

1. History: while the model trains, record every filter's l1 norm after each epoch
   (`NormHistory`, an epoch hook for the shared loop). A channel class's norm is the sum of
   the l1 norms of its "out" slices (one filter per producing layer it couples).
2. Pairing: inside each group (same layers), filters whose norm curves stay close over training
   are redundant. The distance of a pair is  D(a, b) = sum_e |h_a(e) - h_b(e)|  (normalised by
   the group's mean norm so groups compare); pairs are matched greedily, closest first, each
   filter in at most one pair. Pairs are then taken globally, closest first, until removing the
   weaker member of each reaches the cost target.
3. Optimisation: train with an extra term  lam * mean_pairs |n_a - n_b| / n_bar  that pulls the
   l1 norms of each pair together, so one can go without much information loss.
4. Prune the member with the smaller l1 norm from every pair, then retrain (fine-tune).
The paper repeats 1-4; `rounds` splits the cost reduction geometrically over several rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, Masker, param_dict
from graphprune.passes.training import TrainConfig, train


class NormHistory:
    """Per-class l1-norm curves over epochs; call it as `after_epoch(epoch, model)`."""

    def __init__(self, space: ChannelSpace) -> None:
        self.space = space
        self.rows: list[np.ndarray] = []

    def norms(self, model: nn.Module) -> torch.Tensor:
        return self.space.out_l1(param_dict(model))

    @torch.no_grad()
    def __call__(self, _epoch: int, model: nn.Module) -> None:
        self.rows.append(self.norms(model).double().cpu().numpy())

    def history(self) -> dict[int, np.ndarray]:
        h = np.stack(self.rows, axis=1) if self.rows else np.zeros((len(self.space.classes), 0))
        return {c: h[i] for i, c in enumerate(self.space.classes)}


def pair_filters(classes: list[int], history: dict[int, np.ndarray]) -> list[tuple[int, int, float]]:
    """Greedy closest-first matching of one group's classes by l1 distance between norm curves."""
    cands = []
    for i, a in enumerate(classes):
        for b in classes[i + 1:]:
            cands.append((float(np.abs(history[a] - history[b]).sum()), a, b))
    cands.sort()
    used: set[int] = set()
    pairs = []
    for d, a, b in cands:
        if a not in used and b not in used:
            used.update((a, b))
            pairs.append((a, b, d))
    return pairs


def select_pairs(space: ChannelSpace, history: dict[int, np.ndarray], target: float, kind: str = "macs",
                 exclude: set[int] = frozenset()) -> list[tuple[int, int]]:
    """Closest pairs over all groups until dropping one member of each meets the target."""
    ranked = []
    for g in space.groups:
        alive = [c for c in g if c not in exclude]
        if len(alive) < 2:
            continue
        scale = max(float(np.mean([history[c].mean() for c in alive])), 1e-12) * max(len(history[alive[0]]), 1)
        ranked += [(d / scale, a, b) for a, b, d in pair_filters(alive, history)]
    ranked.sort()
    base = space.cost(kind)
    dropped = set(exclude)
    chosen = []
    for _, a, b in ranked:
        if space.cost(kind, dropped) <= target * base * (1 + 1e-9):
            break
        chosen.append((a, b))
        dropped.add(b)  # placeholder member; the actual one is picked after the optimisation
    return chosen


@dataclass
class HBFPConfig:
    target: float
    kind: str = "macs"
    lam: float = 1.0  # weight of the pair-similarity term
    rounds: int = 1


def similarity_term(space: ChannelSpace, pairs: list[tuple[int, int]], lam: float):
    """lam * mean |n_a - n_b| / mean(n): pulls the l1 norms of paired filters together."""
    index = {"cpu": (torch.as_tensor([space.index[a] for a, _ in pairs]),
                     torch.as_tensor([space.index[b] for _, b in pairs]),
                     torch.as_tensor(sorted({space.index[c] for pair in pairs for c in pair})))}

    def term(model: nn.Module) -> torch.Tensor:
        n = space.out_l1(param_dict(model))
        if str(n.device) not in index:  # copied to the device once, not at every step
            index[str(n.device)] = tuple(t.to(n.device) for t in index["cpu"])
        ia, ib, members = index[str(n.device)]
        diffs = (n[ia] - n[ib]).abs()
        mean = n[members].mean().detach().clamp_min(1e-12)
        return lam * diffs.mean() / mean
    return term


def hbfp(model: nn.Module, space: ChannelSpace, x: torch.Tensor, y: torch.Tensor, history: NormHistory,
         cfg: HBFPConfig, opt_cfg: TrainConfig, retrain_cfg: TrainConfig | None = None,
         teacher: nn.Module | None = None, seed: int = 0) -> tuple[nn.Module, frozenset[int], dict]:
    """Pair, optimise, prune (mask), retrain; `history` holds the curves recorded so far and keeps
    recording during the optimisation. Returns (masked model, removed classes, log)."""
    removed: set[int] = set()
    log: dict[str, list] = {"pairs": [], "pair_gap_before": [], "pair_gap_after": []}
    base = space.cost(cfg.kind)
    now = 1.0
    for r in range(1, cfg.rounds + 1):
        goal = cfg.target ** (r / cfg.rounds)
        pairs = select_pairs(space, history.history(), goal, cfg.kind, exclude=removed)
        if not pairs:
            break
        with torch.no_grad():
            n = dict(zip(space.classes, history.norms(model).cpu().tolist()))
        log["pairs"].append(len(pairs))
        log["pair_gap_before"].append(float(np.mean([abs(n[a] - n[b]) / max(n[a] + n[b], 1e-12) for a, b in pairs])))
        masker = Masker(model, space, removed)
        train(model, x, y, opt_cfg, teacher=teacher, loss_term=similarity_term(space, pairs, cfg.lam),
              after_step=lambda _s: masker.apply(), after_epoch=history, seed=seed + r)
        with torch.no_grad():
            n = dict(zip(space.classes, history.norms(model).cpu().tolist()))
        log["pair_gap_after"].append(float(np.mean([abs(n[a] - n[b]) / max(n[a] + n[b], 1e-12) for a, b in pairs])))
        for a, b in pairs:
            removed.add(a if n[a] < n[b] else b)
        masker = Masker(model, space, removed)
        if retrain_cfg is not None and r < cfg.rounds:
            train(model, x, y, retrain_cfg, teacher=teacher, after_step=lambda _s: masker.apply(),
                  after_epoch=history, seed=seed + 100 + r)
        now = space.cost(cfg.kind, removed) / base
    log["achieved"] = [now]
    return model, frozenset(removed), log
