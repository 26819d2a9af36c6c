"""Channels a LayerNorm normalises over (norm_channels): prunable by default ("prune"), kept whole with "freeze".

Under "prune" the stated semantics is: masking a channel excludes it from the LayerNorm's statistics.
The pruned model must then equal the original with the removed channels' consumers zeroed AND its
LayerNorms taking statistics over the kept channels; these tests check that oracle on both paths,
and that it is a real check (it differs from the unmasked original and from plain weight zeroing).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graphprune
from graphprune.analysis.groups import analyze_graph
from graphprune.analysis.rules import RULES
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import run_onnx

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


def _tiny() -> nn.Module:
    from norm_channels_accuracy import tiny_convnext

    torch.manual_seed(0)
    m = tiny_convnext(widths=(16, 32), depths=(1, 1)).eval()
    with torch.no_grad():  # non-trivial affine parameters, so slicing them wrongly shows
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> str:
    from norm_channels_accuracy import export

    path = tmp_path_factory.mktemp("norm") / "tiny.onnx"
    return str(export(_tiny(), torch.randn(1, 1, 16, 16), path))


def _stream_removal(analysis, fraction: float = 0.25) -> frozenset[int]:
    """Some classes of every group that only "prune" makes prunable (the residual streams) and of
    the others, so both the norms and ordinary consumers lose channels."""
    out = set()
    for g in analysis.prunable_groups:
        k = max(1, int(len(g.classes) * fraction))
        out.update(g.classes[1:k + 1])
    return frozenset(out)


def test_default_prunes_layernorm_channels_and_freeze_is_reported(tiny_onnx):
    graph = load_onnx(tiny_onnx).graph
    frozen = analyze_graph(graph, "freeze")
    prunable = analyze_graph(graph)
    assert prunable.ctx.norm_channels == "prune"
    assert len(prunable.prunable_groups) > len(frozen.prunable_groups)
    held = [g for g in frozen.groups if g.frozen and g.reason and "normalises across channels" in g.reason]
    assert held, "the residual streams should be frozen by the LayerNorms under the default"
    res = graphprune.prune(tiny_onnx, target_flops=0.6, measure=False, norm_channels="freeze")
    assert res.report["norm_channels"]["mode"] == "freeze"
    assert res.report["norm_channels"]["frozen_groups"] == len(held)
    res = graphprune.prune(tiny_onnx, target_flops=0.6, measure=False)
    assert res.report["norm_channels"]["mode"] == "prune"
    assert res.report["norm_channels"]["norm_ops"] >= 4
    # a plan from analyze() applies to prune() with the same setting (class ids differ between modes)
    a = graphprune.analyze(tiny_onnx, norm_channels="freeze")
    assert len(a.prunable_groups) == len(frozen.prunable_groups)
    assert len(graphprune.analyze(tiny_onnx).prunable_groups) == len(prunable.prunable_groups)


def test_pruned_onnx_equals_masked_reference_with_kept_statistics(tiny_onnx):
    loaded = load_onnx(tiny_onnx)
    analysis = analyze_graph(loaded.graph, "prune")
    removed = _stream_removal(analysis)
    masks = analysis.keep_masks(removed)
    changed = [n for n, x in analysis.ctx.norm_stats_nodes.items() if not masks[x].all()]
    assert len(changed) >= 3  # stem norm, block norms and downsampling norm all lose channels
    feed = {"input": np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)}
    slim = rewrite_onnx(loaded.proto, analysis, removed)
    reference = mask_consumers_onnx(loaded.proto, analysis, removed)
    got, ref = run_onnx(slim, feed)[0], run_onnx(reference, feed)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the reference is the full-width original, not the pruned model: same weight shapes as the source
    src = {i.name: tuple(i.dims) for i in loaded.proto.graph.initializer}
    assert all(tuple(i.dims) == src[i.name] for i in reference.graph.initializer if i.name in src)
    assert sum(n.op_type == "LayerNormalization" for n in reference.graph.node) == \
        sum(n.op_type == "LayerNormalization" for n in loaded.proto.graph.node) - len(changed)
    # and a real check: zeroing consumers alone (statistics over all channels) gives other numbers
    orig = run_onnx(loaded.proto, feed)[0]
    assert not np.allclose(ref, orig, atol=1e-3)
    plain = _zero_consumers_only(loaded.proto, analysis, removed)
    assert not np.allclose(run_onnx(plain, feed)[0], ref, atol=1e-3)


def _zero_consumers_only(proto, analysis, removed):
    """The old oracle (weights zeroed, every LayerNorm still over all channels)."""
    stats, analysis.ctx.norm_stats_nodes = analysis.ctx.norm_stats_nodes, {}
    try:
        return mask_consumers_onnx(proto, analysis, removed)
    finally:
        analysis.ctx.norm_stats_nodes = stats


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_reference_layer_norm_equals_layer_norm_of_kept_channels(dtype):
    """The reference form, run by onnxruntime on the full tensor, equals F.layer_norm of the kept slice
    (a float16 model: computed in float32 and cast back, as LayerNormalization does)."""
    from onnx import helper, numpy_helper

    c = 12
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, c)).astype(np.float32) * 3 + 1
    scale, bias = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    keep = np.zeros(c, bool)
    keep[[0, 2, 3, 7, 8, 11]] = True
    from graphprune.ir.graph import Node

    node = Node("ln", "LayerNormalization", ["x", "s", "b"], ["y"], {"axis": -1, "epsilon": 1e-5})
    nodes, consts = RULES["LayerNormalization"].reference(node, keep, x.shape, np.dtype(dtype))
    inits = [numpy_helper.from_array(v, k) for k, v in
             {**consts, "s": scale.astype(dtype), "b": bias.astype(dtype)}.items()]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph([helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs) for n in nodes],
                          "ref", [helper.make_tensor_value_info("x", elem, x.shape)],
                          [helper.make_tensor_value_info("y", elem, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    y = run_onnx(model, {"x": x.astype(dtype)})[0].astype(np.float32)
    assert run_onnx(model, {"x": x.astype(dtype)})[0].dtype == dtype
    want = torch.nn.functional.layer_norm(torch.from_numpy(x[..., keep]), (int(keep.sum()),),
                                          torch.from_numpy(scale[keep]), torch.from_numpy(bias[keep]), 1e-5).numpy()
    tol = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(y[..., keep], want, rtol=tol, atol=tol)
    full = torch.nn.functional.layer_norm(torch.from_numpy(x), (c,), torch.from_numpy(scale), torch.from_numpy(bias)).numpy()
    assert not np.allclose(y[..., keep], full[..., keep], atol=1e-3)


def test_prune_pipeline_validates_against_the_kept_statistics_reference(tiny_onnx, tmp_path):
    res = graphprune.prune(tiny_onnx, target_flops=0.5, measure=False, norm_channels="prune")
    assert res.report["norm_channels"]["stats_over_kept"], "the plan should cut into a residual stream"
    feed = {"input": np.random.default_rng(2).standard_normal((1, 1, 16, 16)).astype(np.float32)}
    np.testing.assert_allclose(run_onnx(res.model, feed)[0], run_onnx(res.reference(), feed)[0], rtol=1e-4, atol=1e-5)
    assert abs(res.plan.achieved - 0.5) < 0.03


def test_torch_module_prunes_layernorm_channels_and_equals_its_reference():
    model = _tiny()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
    analysis = graphprune.analyze(model, x[:1], norm_channels="freeze")
    first = graphprune.prune(model, x[:1], target_flops=0.5, hardware="ort-cpu")
    assert len(first.analysis.prunable_groups) > len(analysis.prunable_groups)
    res = graphprune.prune(model, x[:1], removed=_stream_removal(first.analysis), norm_channels="prune")
    assert res.report["norm_channels"]["stats_over_kept"]
    ref = res.reference()
    with torch.no_grad():
        got, want = res.model(x), ref(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(want, before, atol=1e-3)
        assert torch.equal(model(x), before)  # the user's module is untouched
        stats, res.analysis.ctx.norm_stats_nodes = res.analysis.ctx.norm_stats_nodes, {}
        plain = res.reference()  # the old oracle: weights zeroed, statistics over every channel
        res.analysis.ctx.norm_stats_nodes = stats
        assert isinstance(ref, torch.fx.GraphModule) and not isinstance(plain, torch.fx.GraphModule)
        assert not torch.allclose(plain(x), want, atol=1e-3)


def test_torchvision_layernorm2d_prunes_through_functional_layer_norm():
    """torchvision's LayerNorm2d calls F.layer_norm inside its forward: fx traces through it, so the
    rewrite edits the call's normalized_shape and the reference re-routes that call."""
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), LayerNorm2d(16), nn.Conv2d(16, 24, 1), nn.GELU(),
                          nn.Conv2d(24, 16, 1), LayerNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    first = graphprune.prune(model, x[:1], target_flops=0.5, norm_channels="prune", hardware="ort-cpu", round_to=1)
    res = graphprune.prune(model, x[:1], removed=_stream_removal(first.analysis, 0.4), norm_channels="prune")
    assert len(res.report["norm_channels"]["stats_over_kept"]) == 2
    assert res.report["norm_channels"]["stats_over_kept"]
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), res.reference()(x), rtol=1e-4, atol=1e-5)


def test_cli_norm_channels_flag(tiny_onnx, tmp_path):
    from click.testing import CliRunner

    from graphprune.cli import main

    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(main, ["prune", tiny_onnx, "--target-flops", "0.5", "--no-measure", "--norm-channels",
                                  "freeze", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["norm_channels"]["mode"] == "freeze" and out.exists()
    r = CliRunner().invoke(main, ["prune", tiny_onnx, "--target-flops", "0.5", "--no-measure", "--json", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["norm_channels"]["mode"] == "prune"
    r = CliRunner().invoke(main, ["prune", tiny_onnx, "--target-flops", "0.5", "--no-measure", "--norm-channels", "all"])
    assert r.exit_code == 2
    with pytest.raises(graphprune.GraphpruneError, match="norm_channels"):
        graphprune.prune(tiny_onnx, target_flops=0.5, norm_channels="kept")


def test_a_reference_that_cannot_run_fails_validation_instead_of_skipping_it(tiny_onnx, monkeypatch):
    """The kept-statistics reference is built by us: if it breaks, the equivalence check must not be
    skipped silently (a reference of a model that cannot run at all is left to the plain validation)."""
    import dataclasses

    from graphprune.ir.graph import Node

    def broken(node, keep, shape):
        return [Node(f"{node.name}_bad", "Relu", [node.inputs[0], node.inputs[0]], [node.outputs[0]])], {}

    first = graphprune.prune(tiny_onnx, target_flops=0.5, measure=False)
    removed = _stream_removal(first.analysis)
    monkeypatch.setitem(RULES, "LayerNormalization", dataclasses.replace(RULES["LayerNormalization"], reference=broken))
    with pytest.raises(graphprune.GraphpruneError, match="masked reference"):
        graphprune.prune(tiny_onnx, removed=removed, measure=False)


def test_inspect_shows_either_view(tiny_onnx):
    from click.testing import CliRunner

    from graphprune.cli import main

    counts = {}
    for mode in ("prune", "freeze"):
        r = CliRunner().invoke(main, ["inspect", tiny_onnx, "--json", "--norm-channels", mode])
        assert r.exit_code == 0, r.output
        view = json.loads(r.stdout)
        counts[mode] = sum(1 for g in view["groups"] if not g["frozen"])
    assert counts["prune"] > counts["freeze"]
    assert CliRunner().invoke(main, ["inspect", tiny_onnx, "--norm-channels", "x"]).exit_code == 2
