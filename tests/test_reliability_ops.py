"""Ops outside the rule table freeze only their own channels; every opset from 11 to the newest
onnx knows either prunes correctly or fails with one clear line."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, version_converter

import graphprune
from fuzz_cases import assert_equivalent, check_prune
from graphprune.analysis.groups import analyze_graph
from graphprune.examples import example_cnn
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.onnx_rewrite import rewrite_onnx
from graphprune.rewrite.validate import random_feed, run_onnx

MIDDLE_RELU = "/layer2/layer2.0/relu/Relu"


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import warnings

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    return onnx.load(str(path))


def _replace(model: onnx.ModelProto, name: str, op_type: str, domain: str = "", **attrs) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    node = next(n for n in m.graph.node if n.name == name)
    new = helper.make_node(op_type, list(node.input), list(node.output), name=name, domain=domain, **attrs)
    node.CopyFrom(new)
    if domain and domain not in {o.domain for o in m.opset_import}:
        m.opset_import.append(helper.make_opsetid(domain, 1))
    return m


@pytest.mark.parametrize("op_type, attrs", [("Shrink", {"lambd": 0.1}), ("LpNormalization", {"axis": 1})])
def test_standard_op_missing_from_rule_table_is_frozen_rest_prunes(resnet18, op_type, attrs):
    """Shrink is elementwise, LpNormalization(axis=1) mixes channels: both must be frozen, not guessed."""
    model = _replace(resnet18, MIDDLE_RELU, op_type, **attrs)
    base = len(analyze_graph(load_onnx(resnet18).graph).prunable_groups)
    result = graphprune.prune(model, target_flops=0.6)
    assert MIDDLE_RELU in result.analysis.ctx.frozen_nodes
    assert "unsupported op" in result.analysis.ctx.frozen_nodes[MIDDLE_RELU]
    assert len(result.analysis.prunable_groups) >= base - 2  # only the groups around the op are lost
    assert result.report["macs"]["ratio"] <= 0.6 + 1e-9
    assert_equivalent(model, result)


def test_custom_domain_op_in_a_resnet(resnet18):
    """com.example::MyRelu: analysis freezes it, the rest prunes, and with the op swapped back to Relu
    the rewritten model equals consumer masking of the original."""
    model = _replace(resnet18, MIDDLE_RELU, "MyRelu", domain="com.example")
    # an exporter with a custom symbolic declares the op's output type; without it nothing downstream has shapes
    out = next(n for n in model.graph.node if n.name == MIDDLE_RELU).output[0]
    model.graph.value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 128, 8, 8]))
    loaded = load_onnx(model)
    analysis = analyze_graph(loaded.graph)
    assert "com.example::MyRelu" in analysis.ctx.frozen_nodes[MIDDLE_RELU]
    assert len(analysis.prunable_groups) >= len(analyze_graph(load_onnx(resnet18).graph).prunable_groups) - 2
    # half of every prunable class-set, chosen by index: a plan that touches every unfrozen group
    removed = frozenset(c for g in analysis.prunable_groups for c in g.classes[: g.size // 2]
                        if not analysis.is_frozen(c))
    assert removed
    slim = rewrite_onnx(loaded.proto, analysis, removed)
    masked = mask_consumers_onnx(loaded.proto, analysis, removed)
    assert any(n.domain == "com.example" for n in slim.graph.node)
    runnable = [_replace(m, MIDDLE_RELU, "Relu") for m in (slim, masked)]
    feed = random_feed(loaded.proto, loaded.graph, seed=0)
    got, ref = (run_onnx(m, feed)[0] for m in runnable)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)
    # prune() validates custom-domain models with checker + strict shape inference + the direct
    # channel-agreement check (onnxruntime cannot run them) and says so in the report
    result = graphprune.prune(model, target_flops=0.6)
    assert result.report["validation"] == ["checker", "shape inference", "channel agreement"]
    assert "com.example" in result.report["validation_note"]
    assert result.report["macs"]["ratio"] <= 0.6 + 1e-9
    # without declared shapes downstream of the custom op, those channels are frozen too, and the
    # model still prunes (upstream of the op) under the same checker + shape-inference validation
    bare = _replace(resnet18, MIDDLE_RELU, "MyRelu", domain="com.example")
    bare_result = graphprune.prune(bare, target_flops=0.8)
    assert len(bare_result.analysis.prunable_groups) < len(analysis.prunable_groups)
    assert bare_result.report["validation"] == ["checker", "shape inference", "channel agreement"]


NEWEST = onnx.defs.onnx_opset_version()


@pytest.mark.parametrize("opset", range(11, NEWEST + 1))
def test_opset_sweep_example(opset):
    """Upgrades go through onnx's version converter; downgrades (which it cannot do for BatchNorm)
    re-stamp the opset: every op of the example has the same signature from opset 11 on."""
    model = example_cnn(image=16)
    if opset >= 17:
        converted = version_converter.convert_version(model, opset)
    else:
        converted = copy.deepcopy(model)
        converted.opset_import[0].version = opset
        converted.ir_version = helper.find_min_ir_version_for([converted.opset_import[0]])
        onnx.checker.check_model(converted)
    out = check_prune(converted, target=0.5)
    if out.status == "error":
        # the only acceptable refusal: the runtime does not implement this opset yet
        assert "opset" in out.message.lower() or "onnxruntime" in out.message, out.message
        assert opset > 21, out.message


@pytest.mark.parametrize("opset", [11, 13, 17, 20])
def test_opset_sweep_torch_export(opset, tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    import warnings

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35).eval()
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), path, dynamo=False, opset_version=opset)
    assert check_prune(path, target=0.6).status == "ok"
