"""HBFP: identical norm histories are paired; the similarity term closes pair gaps."""
from __future__ import annotations

import numpy as np
import torch

from graphprune.passes.hbfp import HBFPConfig, NormHistory, hbfp, pair_filters, select_pairs, similarity_term
from graphprune.passes.training import TrainConfig
from test_method_hfp import H, W, tiny


def test_identical_histories_are_paired() -> None:
    h = {0: np.array([1.0, 2.0, 3.0]), 1: np.array([5.0, 1.0, 0.5]), 2: np.array([1.0, 2.0, 3.0]),
         3: np.array([5.0, 1.2, 0.4])}
    pairs = pair_filters([0, 1, 2, 3], h)
    assert (0, 2, 0.0) in pairs
    assert {frozenset(p[:2]) for p in pairs} == {frozenset((0, 2)), frozenset((1, 3))}


def test_history_records_l1_norms() -> None:
    m, space = tiny()
    rec = NormHistory(space)
    rec(0, m)
    with torch.no_grad():
        m[0].weight.mul_(2)
    rec(1, m)
    h = rec.history()
    assert np.allclose(h[0][1], 2 * h[0][0])
    assert np.isclose(h[0][0], float(m[0].weight[0].abs().sum()) / 2)


def test_select_pairs_meets_target_and_term_is_zero_for_equal_norms() -> None:
    m, space = tiny()
    with torch.no_grad():
        m[0].weight[1].copy_(m[0].weight[0])
    rec = NormHistory(space)
    rec(0, m)
    pairs = select_pairs(space, rec.history(), target=0.8)
    assert pairs and frozenset(pairs[0]) == frozenset((0, 1))
    term = similarity_term(space, [(0, 1)], 1.0)
    assert float(term(m)) == 0.0


def test_hbfp_end_to_end() -> None:
    m, space = tiny()
    x = torch.randn(64, 1, H, W)
    y = (x.mean((1, 2, 3)) > 0).long()
    rec = NormHistory(space)
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, augment=False)
    from graphprune.passes.training import train

    train(m, x, y, cfg, after_epoch=rec)
    _, removed, log = hbfp(m, space, x, y, rec, HBFPConfig(target=0.6, lam=50.0), cfg)
    assert space.ratio("macs", removed) <= 0.6 + 1e-9
    assert log["pair_gap_after"][0] <= log["pair_gap_before"][0] + 1e-6
    for c in removed:  # removed filters are masked to zero
        for s in space.slices[c]:
            if s.role == "out":
                assert torch.count_nonzero(dict(m.named_parameters())[s.param].index_select(s.axis, torch.tensor(s.index))) == 0
