"""Strategy "speed" (the default for FLOPs targets): the same FLOPs target, spent where the estimated time
goes; the exchange rate MACs-per-element comes from the measured channel table. Not timed."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.backends import channel_table
from graphprune.passes.allocate import allocate
from graphprune.passes.magnitude import l1
from graphprune.passes.time_proxy import register_time_proxy, time_proxy_terms


C = 64  # channels of both prunable groups


def _two_stage_model() -> onnx.ModelProto:
    """x -> conv a (1x1, 8->C, 64x64) -> Relu -> conv b (3x3 stride 4, C->C, 16x16) -> Relu -> conv c (1x1).

    Group A (a's C outputs) lives at 64x64: per channel it holds few MACs for the activation
    elements it writes; group B (b's outputs) at 16x16 holds more MACs per element. Both groups get
    the same weight profile, so their normalised importances are identical: only cost can split them.
    """
    rng = np.random.default_rng(0)
    scale = np.linspace(0.2, 2.0, C).astype(np.float32)
    wa = rng.standard_normal((C, 8, 1, 1)).astype(np.float32)
    wa /= np.abs(wa).sum((1, 2, 3), keepdims=True)
    wa *= scale[:, None, None, None]
    wb = rng.standard_normal((C, C, 3, 3)).astype(np.float32)
    wb /= np.abs(wb).sum((1, 2, 3), keepdims=True)
    wb *= scale[:, None, None, None]
    wc = rng.standard_normal((16, C, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "wb"], ["b"], name="conv_b", strides=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "wc"], ["y"], name="conv_c"),
    ]
    graph = helper.make_graph(
        nodes, "two_stage",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
        [numpy_helper.from_array(w, n) for n, w in (("wa", wa), ("wb", wb), ("wc", wc))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _kept(analysis, plan, tensor: str) -> int:
    return int(analysis.keep_masks(plan.removed)[tensor].sum())


def test_speed_spends_the_same_flops_where_the_estimated_time_is():
    analysis = graphprune.analyze(_two_stage_model())
    scores = l1(analysis)
    kind = register_time_proxy(analysis, elem_macs=36.0)
    glob = allocate(analysis, scores, target=0.5, round_to=2)
    speed = allocate(analysis, scores, target=0.5, round_to=2, strategy="speed", time_kind=kind)
    # the same FLOPs target, met as tightly as the global strategy meets it
    assert speed.achieved == pytest.approx(0.5, abs=0.01) and glob.achieved == pytest.approx(0.5, abs=0.01)
    # the high-resolution group (more elements written per MAC) is pruned harder ...
    assert _kept(analysis, speed, "a") < _kept(analysis, glob, "a")
    assert _kept(analysis, speed, "b") > _kept(analysis, glob, "b")
    # ... so at the same MACs the estimated time is lower
    assert analysis.cost(kind, speed.removed) < analysis.cost(kind, glob.removed)
    # channel counts stay multiples of round_to
    assert _kept(analysis, speed, "a") % 2 == 0 and _kept(analysis, speed, "b") % 2 == 0


def test_time_proxy_is_macs_plus_traffic():
    analysis = graphprune.analyze(_two_stage_model())
    none = time_proxy_terms(analysis, elem_macs=0.0)
    assert sum(b for b, _ in none) == pytest.approx(analysis.macs())
    terms = time_proxy_terms(analysis, elem_macs=10.0)
    # activations written with a channel axis: a, ra (Cx64x64), b, rb (Cx16x16) and y (16x16x16, its channels
    # frozen: a constant term), one write + one read each
    traffic = 2 * 10.0 * (2 * C * 64 * 64 + 2 * C * 16 * 16 + 16 * 16 * 16)
    assert sum(b for b, _ in terms) == pytest.approx(analysis.macs() + traffic)
    # the candidate weight-traffic term: one read per weight element, same exchange rate, sliced like params
    with_w = time_proxy_terms(analysis, elem_macs=10.0, weight_reads=1.0)
    assert sum(b for b, _ in with_w) == pytest.approx(analysis.macs() + traffic + 10.0 * analysis.params())
    assert with_w[len(terms):] == [(10.0 * b, t) for b, t in analysis.cost_terms("params")]


def test_pipeline_default_is_speed_for_flops_and_reports_the_rate(tmp_path):
    model = _two_stage_model()
    res = graphprune.prune(model, target_flops=0.5, round_to=2, measure=False)
    assert res.report["strategy"] == "speed"
    assert res.report["speed_order"] == {"hardware": "ort-cpu", "elem_macs": round(channel_table.elem_macs("ort-cpu"), 2)}
    analysis = graphprune.analyze(model)
    kind = register_time_proxy(analysis, channel_table.elem_macs("ort-cpu"))
    expected = allocate(analysis, l1(analysis), target=0.5, round_to=2, strategy="speed", time_kind=kind)
    assert res.plan.removed == expected.removed
    glob = graphprune.prune(model, target_flops=0.5, round_to=2, measure=False, strategy="global")
    assert "speed_order" not in glob.report and glob.plan.removed != res.plan.removed
    # a parameter target keeps the importance order (the estimate is of time, not of size)
    params = graphprune.prune(model, target_params=0.5, round_to=2, measure=False)
    assert "speed_order" not in params.report
    assert params.plan.removed == graphprune.prune(model, target_params=0.5, round_to=2, measure=False,
                                                   strategy="global").plan.removed


def test_cli_accepts_both_orders(tmp_path):
    from click.testing import CliRunner

    from graphprune.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_two_stage_model(), path)
    for strategy in ("speed", "global"):
        out = tmp_path / f"{strategy}.onnx"
        r = CliRunner().invoke(main, [str(path), "--target-flops", "0.5", "--round-to", "2", "--no-measure",
                                      "--strategy", strategy, "-o", str(out), "--json"])
        assert r.exit_code == 0, r.output
        assert out.exists()


def test_cli_says_that_nothing_repairs_the_layers_without_calibration(tmp_path):
    """The default speed order costs accuracy when nothing repairs the pruned layers (docs/methods.md):
    a run without --calib says so and names the two remedies; a run with calibration data does not."""
    from click.testing import CliRunner

    from graphprune.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(_two_stage_model(), path)
    r = CliRunner().invoke(main, [str(path), "--target-flops", "0.5", "--round-to", "2", "--no-measure", "--dry-run"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "recovery: none (no calibration data)" in text and "--calib" in text and "--strategy global" in text
    calib = tmp_path / "c.npz"
    np.savez(calib, **{_two_stage_model().graph.input[0].name: np.random.default_rng(0).standard_normal(
        (8, *[d.dim_value for d in _two_stage_model().graph.input[0].type.tensor_type.shape.dim][1:])).astype(np.float32)})
    r = CliRunner().invoke(main, [str(path), "--target-flops", "0.5", "--round-to", "2", "--no-measure", "--dry-run",
                                  "--calib", str(calib)])
    assert r.exit_code == 0, r.output
    assert "no calibration data" not in " ".join(r.output.split())


def test_exchange_rate_is_fitted_from_the_curves():
    a, b = 2e-8, 5e-7  # ms per MAC, ms per element moved: b / a = 25 MACs per element
    curves = {}
    for op in ("conv1x1", "conv3x3"):
        batch, size, k = channel_table._geometry("ort-cpu", op)
        curves[op] = [(c, a * batch * c * c * k * k * size * size + b * batch * 2 * c * size * size)
                      for c in range(64, 193)]
    assert channel_table.fit_elem_macs("ort-cpu", curves, 16) == pytest.approx(25.0, rel=1e-6)
    for hw in channel_table.HARDWARE:  # the shipped table yields a usable rate for every backend
        assert 1.0 <= channel_table.elem_macs(hw) <= 1000.0


def test_a_calibrated_table_rate_takes_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = dict(json.loads(channel_table.SHIPPED.read_text())["ort-cpu"], elem_macs=7.5)
    channel_table.write_table({"ort-cpu": entry}, channel_table.user_table_path())
    assert channel_table.elem_macs("ort-cpu") == 7.5
    res = graphprune.prune(_two_stage_model(), target_flops=0.5, round_to=2, measure=False)
    assert res.report["speed_order"]["elem_macs"] == 7.5
    # a hand-written table without curves: the multiple is the user's, the rate the shipped table's
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "none"))
    shipped = channel_table.elem_macs("ort-cpu")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "hand"))
    channel_table.write_table({"ort-cpu": {"multiple": 8, "measured_on": "test", "curves": {}}},
                              channel_table.user_table_path())
    assert channel_table.channel_multiple("ort-cpu") == 8
    assert channel_table.elem_macs("ort-cpu") == shipped != 7.5


def test_round_to_auto_is_strict_on_cpu_and_halves_narrow_groups_on_gpu():
    from graphprune.examples import example_cnn
    from graphprune.passes.allocate import group_multiples, resolve_round_to

    analysis = graphprune.analyze(example_cnn())
    for hw, halve in (("ort-cpu", False), ("cuda-fp16", True)):
        multiple = channel_table.channel_multiple(hw)
        multiples, info = resolve_round_to(analysis, "auto", hw, "macs", 0.6)
        assert multiples == group_multiples(analysis, multiple, halve=halve), hw
        assert ("halved" in info["round_to_source"]) == halve
    # the two rules differ on this model (groups narrower than twice the GPU multiple exist)
    assert group_multiples(analysis, 32, halve=True) != group_multiples(analysis, 32, halve=False)
