"""Targeted rule-table cases, each checked by pruning + consumer-masking equivalence."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.validate import random_feed, run_onnx

RNG = np.random.default_rng(0)


def const(name, shape_or_value, inits):
    v = shape_or_value if isinstance(shape_or_value, np.ndarray) else RNG.standard_normal(shape_or_value).astype(np.float32)
    inits.append(numpy_helper.from_array(v, name))
    return name


def model(nodes, inits, x_shape, y_shape):
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def prune_and_check(m, target=0.6):
    result = graphprune.prune(m, target_flops=target)
    loaded = load_onnx(m)
    feed = random_feed(loaded.proto, loaded.graph, seed=0)
    masked = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    np.testing.assert_allclose(run_onnx(result.model, feed)[0], masked, atol=1e-4, rtol=1e-4)
    return result


def conv(x, cin, cout, name, inits, k=3, **attrs):
    return helper.make_node("Conv", [x, const(name + "w", (cout, cin // attrs.get("group", 1), k, k), inits)],
                            [name], pads=[k // 2] * 4, name=name, **attrs)


def test_conv_transpose_and_resize():
    inits = []
    nodes = [
        conv("x", 3, 16, "c1", inits),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", const("tw", (16, 12, 2, 2), inits)], ["t1"], strides=[2, 2], name="t1"),
        helper.make_node("Resize", ["t1", "", const("sc", np.array([1, 1, 0.5, 0.5], np.float32), inits)], ["z"], mode="nearest"),
        conv("z", 12, 4, "y", inits),
    ]
    result = prune_and_check(model(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8]))
    kept = {g["layers"][0]: g["kept"] for g in result.report["groups"] if not g["frozen"]}
    assert len(kept) == 2  # conv out (16) and conv-transpose out (12) are both prunable


def test_mlp_on_tokens_matmul_and_reduce():
    inits = []
    nodes = [
        helper.make_node("MatMul", ["x", const("w1", (8, 32), inits)], ["h"], name="fc1"),
        helper.make_node("Add", ["h", const("b1", (32,), inits)], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MatMul", ["hr", const("w2", (32, 8), inits)], ["o"], name="fc2"),
        helper.make_node("ReduceMean", ["o"], ["y"], axes=[1], keepdims=0),
    ]
    result = prune_and_check(model(nodes, inits, [1, 5, 8], [1, 8]))
    hidden = [g for g in result.report["groups"] if g["channels"] == 32]
    assert hidden and not hidden[0]["frozen"] and hidden[0]["kept"] < 32


@pytest.mark.parametrize("op,attrs,reason", [
    ("ReduceMean", {"axes": [1], "keepdims": 1}, "reduction across channels"),
    ("LpNormalization", {"axis": 1}, "unsupported op"),
    ("Softmax", {"axis": 1}, "normalises across channels"),
])
def test_channel_mixing_ops_freeze_with_reason(op, attrs, reason):
    inits = []
    nodes = [conv("x", 3, 16, "c1", inits), helper.make_node(op, ["c1"], ["m"], name="mix", **attrs),
             helper.make_node("Relu", ["m"], ["y"])]
    out_c = 1 if op == "ReduceMean" else 16
    an = graphprune.analyze(model(nodes, inits, [1, 3, 8, 8], [1, out_c, 8, 8]))
    g = next(g for g in an.groups if "c1" in g.tensors)
    assert g.frozen and reason in g.reason


def test_pad_on_channel_axis_freezes_but_spatial_pad_prunes():
    inits = []
    pads_c = const("pc", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), inits)
    pads_s = const("ps", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), inits)
    nodes = [conv("x", 3, 16, "c1", inits), helper.make_node("Pad", ["c1", pads_s], ["p1"]),
             conv("p1", 16, 16, "c2", inits), helper.make_node("Pad", ["c2", pads_c], ["p2"]),
             conv("p2", 18, 4, "y", inits)]
    m = model(nodes, inits, [1, 3, 8, 8], [1, 4, 10, 10])
    an = graphprune.analyze(m)
    assert not next(g for g in an.groups if "c1" in g.tensors).frozen
    assert next(g for g in an.groups if "c2" in g.tensors).frozen
    prune_and_check(m, target=0.8)


def test_gemm_without_transpose_and_flatten_columns():
    inits = []
    nodes = [conv("x", 3, 6, "c1", inits), helper.make_node("Flatten", ["c1"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", const("gw", (6 * 16, 10), inits), const("gb", (10,), inits)], ["y"])]
    result = prune_and_check(model(nodes, inits, [1, 3, 4, 4], [1, 10]), target=0.5)
    w = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}["gw"]
    kept = next(g["kept"] for g in result.report["groups"] if "c1" in g["tensors"])
    assert w.shape == (kept * 16, 10)  # each removed channel took its 16 flattened columns with it
