"""An independent MAC counter for checking graphprune's cost model (shared by tests and benchmarks).

It shares no code with graphprune's rule table: it runs the model in onnxruntime with every
intermediate tensor as an output, reads the actual run-time shapes, and counts each executed
weighted op from them. Control flow is followed as executed: an If counts the branch its run-time
condition picks (the branch is run on its own with the outer values it reads).
"""
from __future__ import annotations

from math import prod

import numpy as np
import onnx
from onnx import helper, numpy_helper

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
WEIGHT_SLOT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}
LEFT_SLOT = {"MatMul": 0, "MatMulInteger": 0, "QLinearMatMul": 0, "Gemm": 0}


def _run_all(graph: onnx.GraphProto, values: dict[str, np.ndarray], opsets) -> dict[str, np.ndarray]:
    """Every tensor of `graph` after one run, given the outer values it reads."""
    import onnxruntime as ort

    g = onnx.GraphProto()
    g.CopyFrom(graph)
    produced = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | {i.name for i in g.input}
    needed = sorted({i for n in g.node for i in _reads(n) if i and i not in produced})
    del g.input[:]
    feed = {}
    for i in list(graph.input) + [None] * 0:
        if i.name in values:
            g.input.append(i)
            feed[i.name] = values[i.name]
    for name in needed:
        v = np.asarray(values[name])
        g.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        feed[name] = v
    del g.output[:]
    del g.value_info[:]
    outs = [o for n in g.node for o in n.output if o]
    for o in outs:
        g.output.append(helper.make_empty_tensor_value_info(o))
    model = helper.make_model(g, opset_imports=opsets)
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    res = dict(zip(outs, sess.run(outs, feed)))
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return {**values, **consts, **feed, **res}


def _reads(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node including outer tensors its subgraphs read."""
    names = list(node.input)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            inner = {o for n in a.g.node for o in n.output} | {t.name for t in a.g.initializer} | {
                i.name for i in a.g.input}
            names += [i for n in a.g.node for i in _reads(n) if i not in inner]
    return names


def count_graph(graph: onnx.GraphProto, values: dict[str, np.ndarray], opsets) -> int:
    vals = _run_all(graph, values, opsets)
    total = 0
    for n in graph.node:
        op = n.op_type
        shape = lambda i: np.shape(vals[n.input[i]])  # noqa: E731
        if op in WEIGHT_SLOT:
            w = shape(WEIGHT_SLOT[op])
            per = prod(w[1:])  # one output (input, for ConvTranspose) element sees Cin/g * kernel weights
            ref = shape(0) if op == "ConvTranspose" else np.shape(vals[n.output[0]])
            total += prod(ref) * per
        elif op in LEFT_SLOT:
            a = shape(0)
            trans_a = any(x.name == "transA" and x.i for x in n.attribute)
            k = a[0] if trans_a else a[-1]
            total += prod(np.shape(vals[n.output[0]])) * k
        elif op in GATES:
            x = shape(0)
            total += x[0] * x[1] * (prod(shape(1)) + prod(shape(2)))
        elif op == "If":
            cond = bool(np.asarray(vals[n.input[0]]).ravel()[0])
            branch = next(a.g for a in n.attribute if a.name == ("then_branch" if cond else "else_branch"))
            total += count_graph(branch, vals, opsets)
        elif op in ("Loop", "Scan", "Einsum"):
            raise NotImplementedError(f"independent counter does not handle {op}")
    return total


def count_macs(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> int:
    """MACs of one run of `model` on `feed`, counted from run-time shapes."""
    return count_graph(model.graph, dict(feed), list(model.opset_import))
