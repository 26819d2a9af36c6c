"""Hostile and careless model builders shared by the adversarial tests (tests/test_adversarial*.py)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def conv_chain(names: tuple[str, str, str] = ("conv_a", "conv_b", "conv_c"), image: int = 8, opset: int = 17,
               ir_version: int = 8) -> onnx.ModelProto:
    """x -> Conv(3->16) -> Relu -> Conv(16->16) -> Relu -> Conv(16->4): prunable, names chosen by the caller."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(_w(rng, 16, 3, 3, 3), "w1"), numpy_helper.from_array(_w(rng, 16), "b1"),
             numpy_helper.from_array(_w(rng, 16, 16, 3, 3), "w2"), numpy_helper.from_array(_w(rng, 16), "b2"),
             numpy_helper.from_array(_w(rng, 4, 16, 1, 1), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name=names[0], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name=names[1], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name=names[2])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, image, image])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, image, image])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _body(name: str, reads: str, weight: np.ndarray, out: str) -> onnx.GraphProto:
    """A subgraph with its own Conv weight, reading `reads` from the enclosing scope."""
    return helper.make_graph(
        [helper.make_node("Conv", [reads, f"{name}_w"], [out], name=f"{name}_conv")], name, [],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, f"{name}_w")])


def if_reads_outer(kind: str = "If", channels: int = 16) -> onnx.ModelProto:
    """A Conv producer whose output is read by a Conv inside an If (or Loop) body: the body is a consumer."""
    rng = np.random.default_rng(1)
    c = channels
    inits = [numpy_helper.from_array(_w(rng, 16, 3, 3, 3), "w0"),
             numpy_helper.from_array(_w(rng, c, 16, 3, 3), "w1"), numpy_helper.from_array(_w(rng, c), "b1"),
             numpy_helper.from_array(_w(rng, 4, c, 1, 1), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["h"], name="stem_relu"),
             helper.make_node("Conv", ["h", "w1", "b1"], ["c1"], name="producer", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["t"], name="relu"),
             helper.make_node("Conv", ["t", "w2"], ["y"], name="main_consumer")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    if kind == "If":
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["z"], name="branch",
                                      then_branch=_body("then", "t", _w(rng, 4, c, 1, 1), "z_then"),
                                      else_branch=_body("else", "t", _w(rng, 4, c, 1, 1), "z_else")))
    else:  # Loop with one iteration; the body reads t from the outer scope
        inits += [numpy_helper.from_array(np.array(1, dtype=np.int64), "trip"),
                  numpy_helper.from_array(np.array(True), "cond")]
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
             helper.make_node("Conv", ["t", "loop_w"], ["z_body"], name="loop_conv")],
            "loop_body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("z_body", TensorProto.FLOAT, [1, 4, 8, 8])],
            [numpy_helper.from_array(_w(rng, 4, c, 1, 1), "loop_w")])
        nodes.append(helper.make_node("Loop", ["trip", "cond"], ["z"], name="loop", body=body))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8] if kind == "If" else [1, 1, 4, 8, 8])]
    graph = helper.make_graph(nodes, "subgraph_reader", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def pixel_shuffle(size: int, channels: int = 64, scale: int = 2) -> onnx.ModelProto:
    """ESPCN-style upsampler: Conv to C*s*s channels, Reshape 1xCxsxsxHxW, Transpose, Reshape to 1xCx(sH)x(sW)."""
    rng = np.random.default_rng(2)
    c, s, h = channels, scale, size
    inits = [numpy_helper.from_array(_w(rng, 16, 3, 3, 3), "w0"),
             numpy_helper.from_array(_w(rng, c * s * s, 16, 3, 3), "w1"),
             numpy_helper.from_array(np.array([1, c, s, s, h, h], dtype=np.int64), "shape1"),
             numpy_helper.from_array(np.array([1, c, h * s, h * s], dtype=np.int64), "shape2"),
             numpy_helper.from_array(_w(rng, 3, c, 3, 3), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="expand", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c1", "shape1"], ["s1"], name="split"),
             helper.make_node("Transpose", ["s1"], ["t1"], name="shuffle", perm=[0, 1, 4, 2, 5, 3]),
             helper.make_node("Reshape", ["t1", "shape2"], ["s2"], name="merge"),
             helper.make_node("Conv", ["s2", "w2"], ["y"], name="head", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "pixel_shuffle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, h * s, h * s])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def huge_input(side: int = 100000) -> onnx.ModelProto:
    """A static 1x3xNxN input: analysis must not allocate per element, validation must refuse in one line."""
    model = conv_chain()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = side
    out = model.graph.output[0].type.tensor_type.shape.dim
    out[2].dim_value = out[3].dim_value = side
    return model


def ir3_model(opset: int = 8) -> onnx.ModelProto:
    """An old-style model: IR version 3, initializers also listed as graph inputs (as IR 3 requires)."""
    model = conv_chain(opset=opset, ir_version=3)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model
