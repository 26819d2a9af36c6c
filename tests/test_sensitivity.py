"""Sensitivity-aware allocation (passes/sensitivity.py): measured damage, not weight size, sets the budgets.

The model has two prunable groups. Group A (`a`) carries the signal to the output; group B (`b`) is
wide and redundant: its consumer reads it with tiny weights, so removing it barely moves the output.
The importance scores given to the allocator deliberately favour B (weight-magnitude criteria would
do the same: B's filters are large), so a global ranking empties A first. Sensitivity must take B
first and still meet the FLOPs target (to within one channel of the group it prunes).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.analysis.groups import analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.passes.allocate import allocate
from graphprune.passes.sensitivity import (OnnxMaskedRunner, _envelope_slopes, calibration_feeds, prices,
                                           sensitivity_allocate)

A, B = 8, 16


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    init = {
        "w1": rng.normal(0, 0.3, (A, 3, 3, 3)), "b1": rng.normal(0, 0.1, A),
        "w2": rng.normal(0, 1.0, (B, A, 1, 1)), "b2": rng.normal(0, 0.1, B),
        "w3": rng.normal(0, 1.0, (4, A, 1, 1)),           # A -> output, full strength
        "w4": rng.normal(0, 1e-3, (4, B, 1, 1)),          # B -> output, almost nothing
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="relu_a"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv_b"),
        helper.make_node("Relu", ["c2"], ["b"], name="relu_b"),
        helper.make_node("Conv", ["a", "w3"], ["ya"], name="head_a"),
        helper.make_node("Conv", ["b", "w4"], ["yb"], name="head_b"),
        helper.make_node("Add", ["ya", "yb"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "two_groups",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _setup():
    loaded = load_onnx(_model())
    analysis = analyze_graph(loaded.graph)
    groups = {tuple(sorted(g.tensors)): g for g in analysis.prunable_groups}
    ga = next(g for t, g in groups.items() if "a" in t)
    gb = next(g for t, g in groups.items() if "b" in t)
    # scores that make a global ranking prefer to cut A: A low, B high
    scores = {c: 0.1 + 0.01 * i for i, c in enumerate(ga.classes)}
    scores.update({c: 10.0 + i for i, c in enumerate(gb.classes)})
    calib = np.random.default_rng(1).normal(size=(8, 1, 3, 8, 8)).astype(np.float32)
    feeds = [{"x": calib[i]} for i in range(len(calib))]
    return loaded, analysis, ga, gb, scores, feeds


def _removed_from(plan, group) -> int:
    return sum(1 for c in group.classes if c in plan.removed)


def test_redundant_group_goes_first_and_target_is_met():
    loaded, analysis, ga, gb, scores, feeds = _setup()
    runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
    base = analysis.macs()
    for k in (1, 3):
        # a target that removing exactly k channels of A meets: the score ranking takes those
        target = analysis.macs(set(sorted(ga.classes, key=scores.get)[:k])) / base
        naive = allocate(analysis, scores, target=target, normalize=False)
        assert _removed_from(naive, ga) > 0  # the premise: a score ranking cuts the sensitive group
        plan, sens = sensitivity_allocate(analysis, scores, runner, target=target)
        assert _removed_from(plan, ga) == 0, plan.kept
        assert _removed_from(plan, gb) > 0
        assert plan.cost <= target * plan.base_cost * (1 + 1e-9)
        # as tight as B's granularity allows: within one B channel's cost of the target
        one_b = 1 - analysis.macs({gb.classes[0]}) / base
        assert target - one_b <= plan.achieved <= target * (1 + 1e-9)
        # measured curves: B's damage is orders of magnitude below A's at the same ratio
        da = dict(sens.curves[ga.id])
        db = dict(sens.curves[gb.id])
        assert max(db.values()) < 1e-3 * max(da.values())


def test_order_within_group_follows_scores():
    loaded, analysis, ga, gb, scores, feeds = _setup()
    runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
    plan, _ = sensitivity_allocate(analysis, scores, runner, target=0.85)
    taken = [c for c in gb.classes if c in plan.removed]
    lowest = sorted(gb.classes, key=scores.get)[: len(taken)]
    assert sorted(taken) == sorted(lowest)


def test_mean_replacement_of_a_constant_channel_is_exact():
    """A channel that is constant on the data costs nothing: the runner replaces it by its mean."""
    loaded, analysis, ga, gb, scores, feeds = _setup()
    runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
    # make channel 0 of group B dead-constant: zero filter, bias 0.5 (relu keeps it)
    proto = loaded.proto
    for init in proto.graph.initializer:
        if init.name in ("w2", "b2"):
            arr = numpy_helper.to_array(init).copy()
            arr[0] = 0.0 if init.name == "w2" else 0.5
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    runner = OnnxMaskedRunner(proto, analysis, feeds)
    pos = int(np.nonzero(analysis.roots["b"] == analysis.roots["b"][0])[0][0])
    cls = int(analysis.roots["b"][pos])
    ref = runner.outputs(frozenset())
    got = runner.outputs(frozenset({cls}))
    np.testing.assert_allclose(got[0], ref[0], atol=1e-6)


def test_envelope_prices_are_non_decreasing():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([0.0, 0.5, 0.6, 3.0, 3.1])  # not convex: the envelope smooths it
    s = _envelope_slopes(x, y)
    assert np.all(np.diff(s) >= -1e-12)
    assert s[0] == pytest.approx(0.3)  # 0 -> 2: 0.6 / 2


def test_prices_strictly_increase_along_the_order():
    loaded, analysis, ga, gb, scores, feeds = _setup()
    runner = OnnxMaskedRunner(loaded.proto, analysis, feeds)
    _, sens = sensitivity_allocate(analysis, scores, runner, target=0.9)
    for g in (ga, gb):
        order = sorted((c for c in g.classes if c in sens.prices), key=scores.get)
        vals = [sens.prices[c] for c in order]
        assert all(b > a for a, b in zip(vals, vals[1:]))


def test_api_strategy_sensitivity_onnx(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    before = path.read_bytes()
    calib = np.random.default_rng(2).normal(size=(8, 3, 8, 8)).astype(np.float32)
    res = graphprune.prune(str(path), target_flops=0.8, strategy="sensitivity", calib=calib)
    assert res.plan.achieved <= 0.8 + 1e-9
    assert res.report["sensitivity"]["runs"] > 0
    assert path.read_bytes() == before
    with pytest.raises(GraphpruneError, match="calibration"):
        graphprune.prune(str(path), target_flops=0.8, strategy="sensitivity")


def test_calibration_feeds_forms():
    x = np.zeros((5, 3, 8, 8), np.float32)
    assert len(calibration_feeds(x, ["x"], samples=3)) == 3
    assert len(calibration_feeds({"x": x}, ["x"], samples=16)) == 5
    assert calibration_feeds([x[:2], x[2:]], ["x"], samples=4, batch=2)[1]["x"].shape == (2, 3, 8, 8)
    with pytest.raises(GraphpruneError):
        calibration_feeds(x[:0], ["x"])
    with pytest.raises(GraphpruneError):
        calibration_feeds({"y": x}, ["x"])


def test_torch_module_sensitivity_prunes_the_redundant_group():
    torch = pytest.importorskip("torch")
    from torch import nn

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a = nn.Conv2d(3, A, 3, padding=1)
            self.conv_b = nn.Conv2d(A, B, 1)
            self.head_a = nn.Conv2d(A, 4, 1, bias=False)
            self.head_b = nn.Conv2d(B, 4, 1, bias=False)
            with torch.no_grad():
                self.head_b.weight.mul_(1e-3)

        def forward(self, x):
            a = torch.relu(self.conv_a(x))
            return self.head_a(a) + self.head_b(torch.relu(self.conv_b(a)))

    torch.manual_seed(0)
    m = Two().eval()
    x = torch.randn(16, 3, 8, 8)
    analysis = graphprune.analyze(m, x[:1])
    ga = next(g for g in analysis.prunable_groups if g.size == A)
    gb = next(g for g in analysis.prunable_groups if g.size == B)
    scores = {c: 0.1 + 0.01 * i for i, c in enumerate(ga.classes)}
    scores.update({c: 10.0 + i for i, c in enumerate(gb.classes)})
    res = graphprune.prune(m, x[:1], target_flops=0.85, strategy="sensitivity", calib=x, scores=scores)
    assert res.plan.achieved <= 0.85 + 1e-9
    assert res.model.conv_a.out_channels == A
    assert res.model.conv_b.out_channels < B
    # the user's module is untouched and the runner's rewiring did not leak into the result
    assert m.conv_b.out_channels == B
    out = res.model(x)
    assert out.shape == (16, 4, 8, 8)
