"""HFP: the differentiable cost equals the real count at 0/1 gates; gates act like masks."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, GatePoint, Masker, Slice, plan_from_scores
from graphprune.passes.hfp import Gates, HFPConfig, budget_penalty, hfp
from graphprune.passes.training import TrainConfig

H = W = 6


def tiny() -> tuple[nn.Module, ChannelSpace]:
    """conv(1->4) bn relu conv(4->3) bn relu pool fc(3->2), its channel space written by hand."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    slices: dict[int, list[Slice]] = {}
    for i in range(4):
        slices[i] = [Slice("0.weight", 0, (i,), "out"), Slice("0.bias", 0, (i,), "coupled"),
                     Slice("1.weight", 0, (i,), "coupled"), Slice("1.bias", 0, (i,), "coupled"),
                     Slice("3.weight", 1, (i,), "in")]
    for j in range(3):
        c = 4 + j
        slices[c] = [Slice("3.weight", 0, (j,), "out"), Slice("4.weight", 0, (j,), "coupled"),
                     Slice("4.bias", 0, (j,), "coupled"), Slice("8.weight", 1, (j,), "in")]
    roots = {"t1": np.arange(4), "t2": np.arange(4, 7)}
    terms = {
        "macs": [(9 * H * W * 1 * 4, ("t1",)), (9 * H * W * 4 * 3, ("t1", "t2")), (3 * 2, ("t2",))],
        "params": [(36, ("t1",)), (4, ("t1",)), (4, ("t1",)), (4, ("t1",)), (108, ("t1", "t2")),
                   (3, ("t2",)), (3, ("t2",)), (6, ("t2",)), (2, ())],
    }
    space = ChannelSpace(list(range(7)), [[0, 1, 2, 3], [4, 5, 6]], slices, roots, terms,
                         [GatePoint("1", "t1"), GatePoint("4", "t2")])
    return m, space


def real_counts(k1: int, k2: int) -> tuple[int, int]:
    """MACs and params of the physically smaller network with k1 / k2 channels kept."""
    macs = 9 * H * W * 1 * k1 + 9 * H * W * k1 * k2 + k2 * 2
    params = 9 * k1 + k1 + 2 * k1 + 9 * k1 * k2 + 2 * k2 + 2 * k2 + 2
    return macs, params


def test_soft_cost_equals_real_count_at_binary_gates() -> None:
    _, space = tiny()
    for bits in itertools.product([0.0, 1.0], repeat=7):
        k1, k2 = int(sum(bits[:4])), int(sum(bits[4:]))
        g = torch.tensor(bits, dtype=torch.float64)
        macs, params = real_counts(k1, k2)
        assert float(space.soft_cost("macs", g)) == pytest.approx(macs)
        assert float(space.soft_cost("params", g)) == pytest.approx(params)


def test_soft_cost_matches_graphprune_analysis_on_resnet20() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cifar_resnet import resnet20

    from graphprune.passes.channels import space_of

    space = space_of(resnet20(), torch.zeros(1, 1, 16, 16))
    rng = np.random.default_rng(0)
    bits = (rng.random(len(space.classes)) < 0.6).astype(np.float64)
    removed = {c for c, b in zip(space.classes, bits) if b == 0}
    g = torch.tensor(bits)
    assert float(space.soft_cost("macs", g)) == pytest.approx(space.analysis.macs(removed))
    assert float(space.soft_cost("params", g)) == pytest.approx(space.analysis.params(removed))


def test_soft_cost_is_differentiable_and_bilinear() -> None:
    _, space = tiny()
    g = torch.full((7,), 0.5, dtype=torch.float64, requires_grad=True)
    c = space.soft_cost("macs", g)
    c.backward()
    # MACs = b1 * m1 + b2 * m1 * m2 + b3 * m2 (m = mean gate of a layer), so for a conv1 channel
    # d MACs / d g = (b1 + b2 * m2) / 4
    b1, b2 = 9 * H * W * 1 * 4, 9 * H * W * 4 * 3
    assert float(g.grad[0]) == pytest.approx((b1 + b2 * 0.5) / 4)


def test_binary_gates_equal_masking() -> None:
    m, space = tiny()
    m.eval()
    x = torch.randn(5, 1, H, W)
    gates = Gates(m, space)
    removed = {1, 3, 5}
    with torch.no_grad():
        gates.theta.copy_(torch.tensor([-1e4 if c in removed else 1e4 for c in space.classes]))
        gated = m(x)
    gates.remove()
    Masker(m, space, removed)
    with torch.no_grad():
        torch.testing.assert_close(m(x), gated, atol=1e-5, rtol=1e-5)


def test_penalty_zero_inside_budget() -> None:
    _, space = tiny()
    base = {"macs": space.cost("macs")}
    ones = torch.ones(7, dtype=torch.float64)
    assert float(budget_penalty(space, ones, {"macs": 1.0}, base)) == 0.0
    assert float(budget_penalty(space, ones, {"macs": 0.5}, base)) == pytest.approx(0.5)


def test_hfp_end_to_end_meets_both_targets() -> None:
    m, space = tiny()
    x = torch.randn(64, 1, H, W)
    y = (x.mean((1, 2, 3)) > 0).long()
    targets = {"macs": 0.5, "params": 0.6}
    _, removed, _ = hfp(m, space, x, y, HFPConfig(targets, gate_lr=0.2),
                        TrainConfig(epochs=3, batch_size=16, progress=False, augment=False))
    for k, t in targets.items():
        assert space.ratio(k, removed) <= t + 1e-9
    assert not any(isinstance(h, object) and h for h in getattr(m[1], "_forward_hooks", {}).values())


def test_plan_from_scores_gives_back() -> None:
    _, space = tiny()
    scores = {c: float(c) for c in space.classes}
    removed = plan_from_scores(space, scores, {"macs": 0.7})
    assert space.ratio("macs", removed) <= 0.7
    # giving back any removed class would break the target
    for c in removed:
        assert space.ratio("macs", removed - {c}) > 0.7
