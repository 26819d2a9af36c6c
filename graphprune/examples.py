"""A built-in example CNN, made with onnx.helper so the demo needs neither torch nor a download.

It has the structures pruning must get right: a residual add, a depthwise conv, a squeeze-excite
multiply, a channel concat, BatchNorm, and flatten -> Gemm classifier.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, prefix: str, value: np.ndarray) -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32) if value.dtype.kind == "f" else value, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out.replace(op_type.lower(), op_type), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / (cin // group * k * k))
        b = self.rng.standard_normal(cout) * 0.1
        return self.op("Conv", [x, self.const("w", w), self.const("b", b)], kernel_shape=[k, k],
                       pads=[k // 2] * 4, strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [r.uniform(0.5, 1.5, c), r.standard_normal(c) * 0.1, r.standard_normal(c) * 0.1, r.uniform(0.5, 1.5, c)]
        return self.op("BatchNormalization", [x] + [self.const(p, v) for p, v in zip(("gamma", "beta", "mean", "var"), params)])


def example_cnn(seed: int = 0, image: int = 32, classes: int = 10) -> onnx.ModelProto:
    """A small CNN covering residual, depthwise, SE, concat, BN and flatten->Gemm."""
    b = _Builder(seed)
    x = "image"
    h = b.op("Relu", [b.bn(b.conv(x, 3, 32), 32)])
    # residual block
    r = b.op("Relu", [b.bn(b.conv(h, 32, 48), 48)])
    r = b.bn(b.conv(r, 48, 32), 32)
    h = b.op("Relu", [b.op("Add", [h, r])])
    # inverted residual with depthwise conv and squeeze-excite
    e = b.op("Relu", [b.conv(h, 32, 96, k=1)])
    d = b.op("Relu", [b.conv(e, 96, 96, k=3, stride=2, group=96)])
    s = b.op("GlobalAveragePool", [d])
    s = b.op("Relu", [b.conv(s, 96, 24, k=1)])
    s = b.op("Sigmoid", [b.conv(s, 24, 96, k=1)])
    d = b.op("Mul", [d, s])
    h = b.conv(d, 96, 48, k=1)
    # two branches concatenated
    left = b.op("Relu", [b.conv(h, 48, 32)])
    right = b.op("Relu", [b.conv(h, 48, 24, k=1)])
    h = b.op("Concat", [left, right], axis=1)
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.conv(h, 56, 64)])
    h = b.op("Flatten", [h], axis=1)
    side = image // 4
    w = b.rng.standard_normal((classes, 64 * side * side)) * np.sqrt(1.0 / (64 * side * side))
    logits = b.op("Gemm", [h, b.const("fc_w", w), b.const("fc_b", np.zeros(classes))], transB=1)
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes, "graphprune_example",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="graphprune")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
