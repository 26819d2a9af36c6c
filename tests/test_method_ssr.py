"""SSR / AULM: the group proxes and the solver drive a useless group to exactly zero."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, Slice
from graphprune.passes.ssr import AULM, SSRConfig, prox_l20, prox_l21, ssr
from graphprune.passes.training import TrainConfig


def test_prox_l21_soft_threshold() -> None:
    z = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(prox_l21(z, 2.5), z * 0.5)
    assert torch.count_nonzero(prox_l21(z, 5.0)) == 0
    assert torch.count_nonzero(prox_l21(z, 7.0)) == 0


def test_prox_l20_hard_threshold() -> None:
    z = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(prox_l20(z, 24.0), z)
    assert torch.count_nonzero(prox_l20(z, 25.0)) == 0


def toy() -> tuple[nn.Module, ChannelSpace, torch.Tensor, torch.Tensor]:
    """Linear(4->3) -> ReLU -> Linear(3->2); hidden unit 2 only sees a noise input."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    slices = {c: [Slice("0.weight", 0, (c,), "out"), Slice("0.bias", 0, (c,), "coupled"),
                  Slice("2.weight", 1, (c,), "in")] for c in range(3)}
    space = ChannelSpace([0, 1, 2], [[0, 1, 2]], slices, {"h": np.arange(3)},
                         {"macs": [(12.0, ("h",)), (6.0, ("h",))], "params": [(12.0, ("h",)), (6.0, ("h",))]})
    x = torch.randn(256, 4)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return m, space, x, y


def test_aulm_update_zeroes_a_group_exactly() -> None:
    m, space, _, _ = toy()
    with torch.no_grad():
        m[0].weight[2].mul_(0.01)
        m[0].bias[2].mul_(0.01)
    solver = AULM(m, space, SSRConfig(target=0.7, rho=1.0))
    solver.update()
    assert solver.zero == {2}
    assert torch.count_nonzero(solver.v[2]) == 0
    assert torch.count_nonzero(solver.v[0]) > 0
    # the dense penalty equals the group-by-group sum
    with torch.no_grad():
        m[0].weight.add_(0.1)
    torch.testing.assert_close(solver.penalty(), solver.penalty_by_groups())


def test_aulm_training_drives_group_to_zero() -> None:
    for reg in ("l21", "l20"):
        m, space, x, y = toy()
        cfg = SSRConfig(target=0.7, rho=1.0, reg=reg, every=4)
        w_before = m[0].weight.detach().clone()
        _, removed, log = ssr(m, space, x, y, cfg,
                              TrainConfig(epochs=6, batch_size=32, lr=0.1, augment=False, progress=False))
        assert len(removed) == 1
        (c,) = removed
        # the removed group is exactly zero in the trained weights: removing it changes nothing
        assert torch.count_nonzero(m[0].weight[c]) == 0 and float(m[0].bias[c]) == 0.0
        assert not torch.equal(w_before, m[0].weight)
        # the splitting variable converged: W_g of the zeroed group was already ~0 before projection
        assert log["zero_cost"][-1] <= 0.7 + 1e-9
