"""Random CNN DAG generator (onnx.helper) for property-based tests of analysis + rewrite."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class RandomCNN:
    def __init__(self, rng: np.random.Generator, side: int = 8) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.tensors: list[tuple[str, int]] = [("x", 3)]  # (name, channels); all share the spatial size
        self.side = side
        self.n = 0

    def _name(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def _const(self, value: np.ndarray) -> str:
        name = self._name("c")
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def _op(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self._name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self._name(op), **attrs))
        return outs

    def conv(self, t: str, cin: int, cout: int, k: int = 3, group: int = 1, bn: bool = True, act: bool = True) -> str:
        w = (self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.1).astype(np.float32)
        y = self._op("Conv", [t, self._const(w), self._const(b)], kernel_shape=[k, k], pads=[k // 2] * 4, group=group)[0]
        if bn:
            p = [self.rng.uniform(0.5, 1.5, cout), self.rng.standard_normal(cout) * 0.1,
                 self.rng.standard_normal(cout) * 0.1, self.rng.uniform(0.5, 1.5, cout)]
            y = self._op("BatchNormalization", [y] + [self._const(v.astype(np.float32)) for v in p])[0]
        if act:
            y = self._op(str(self.rng.choice(["Relu", "Sigmoid", "HardSwish", "Tanh"])), [y])[0]
        return y

    def pick(self) -> tuple[str, int]:
        # prefer recent tensors so the graph is deep rather than wide
        k = len(self.tensors)
        i = int(min(k - 1, max(0, k - 1 - self.rng.geometric(0.5) + 1)))
        return self.tensors[i]

    def step(self, kind: str) -> None:
        t, c = self.pick()
        r = self.rng
        if kind == "conv":
            cout = int(r.integers(2, 17))
            self.tensors.append((self.conv(t, c, cout, k=int(r.choice([1, 3]))), cout))
        elif kind == "depthwise" and c > 1:
            m = int(r.choice([1, 2]))
            self.tensors.append((self.conv(t, c, c * m, group=c), c * m))
        elif kind == "grouped" and c % 2 == 0 and c >= 4:
            g = 2
            cout = g * int(r.integers(1, 5))
            self.tensors.append((self.conv(t, c, cout, group=g), cout))
        elif kind == "residual" and c > 3:
            y = self.conv(t, c, c, act=False)
            self.tensors.append((self._op("Add", [t, y])[0], c))
        elif kind == "concat":
            t2, c2 = self.pick()
            if t2 != t:
                self.tensors.append((self._op("Concat", [t, t2], axis=1)[0], c + c2))
        elif kind == "split" and c >= 4:
            a = int(r.integers(1, c))
            outs = self._op("Split", [t, self._const(np.array([a, c - a], dtype=np.int64))], n_out=2, axis=1)
            self.tensors += [(outs[0], a), (outs[1], c - a)]
        elif kind == "slice" and c >= 4:
            s = int(r.integers(0, c // 2))
            e = int(r.integers(s + 1, c + 1))
            y = self._op("Slice", [t, self._const(np.array([s], np.int64)), self._const(np.array([e], np.int64)),
                                   self._const(np.array([1], np.int64))])[0]
            self.tensors.append((y, e - s))
        elif kind == "se" and c > 3:
            red = max(1, c // 4)
            s = self._op("GlobalAveragePool", [t])[0]
            s = self.conv(s, c, red, k=1, bn=False)
            s = self.conv(s, red, c, k=1, bn=False, act=False)
            s = self._op("Sigmoid", [s])[0]
            self.tensors.append((self._op("Mul", [t, s])[0], c))
        elif kind == "pool":
            self.tensors.append((self._op("MaxPool", [t], kernel_shape=[3, 3], pads=[1, 1, 1, 1])[0], c))
        elif kind == "shuffle" and c % 2 == 0 and c >= 4:
            s = self.side
            y = self._op("Reshape", [t, self._const(np.array([1, 2, c // 2, s, s], np.int64))])[0]
            y = self._op("Transpose", [y], perm=[0, 2, 1, 3, 4])[0]
            y = self._op("Reshape", [y, self._const(np.array([1, c, s, s], np.int64))])[0]
            self.tensors.append((y, c))
        elif kind == "mulconst":
            scale = self._const((self.rng.uniform(0.5, 1.5, (c, 1, 1))).astype(np.float32))
            self.tensors.append((self._op("Mul", [t, scale])[0], c))

    def finish(self, classes: int = 5) -> onnx.ModelProto:
        t, c = self.tensors[-1]
        g = self._op("GlobalAveragePool", [t])[0]
        f = self._op("Flatten", [g], axis=1)[0]
        w = (self.rng.standard_normal((classes, c)) / np.sqrt(c)).astype(np.float32)
        self.nodes.append(helper.make_node("Gemm", [f, self._const(w)], ["y"], name="head", transB=1))
        graph = helper.make_graph(self.nodes, "random_cnn",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, self.side, self.side])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


KINDS = ["conv", "depthwise", "grouped", "residual", "concat", "split", "slice", "se", "pool", "mulconst", "shuffle"]


def random_cnn(seed: int, steps: list[str]) -> onnx.ModelProto:
    b = RandomCNN(np.random.default_rng(seed))
    b.step("conv")
    for kind in steps:
        b.step(kind)
    b.step("conv")
    return b.finish()
