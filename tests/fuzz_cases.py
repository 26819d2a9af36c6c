"""Mutators and the oracle shared by the fuzz tests and benchmarks/fuzz_campaign.py.

The oracle is the reliability contract: for any input, prune() either returns a model that is
equivalent to consumer-side masking of the original, or raises GraphpruneError with one line.
Any other exception (or a multi-line message) is a failure.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.errors import GraphpruneError
from graphprune.examples import example_cnn

# -- seeds ------------------------------------------------------------------------------------


def seed_models() -> list[onnx.ModelProto]:
    """Small, fast seeds: the example CNN at two sizes and a random DAG (no torch needed)."""
    from random_cnn import KINDS, random_cnn

    return [example_cnn(seed=0, image=16), example_cnn(seed=1, image=8, classes=3),
            random_cnn(5, KINDS * 2)]


# -- byte-level mutations ---------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Truncate, flip, splice or replace the serialised model."""
    kind = rng.choice(["truncate", "flip", "splice", "random", "zero_run", "append"])
    buf = bytearray(data)
    if kind == "truncate":
        return kind, bytes(buf[: int(rng.integers(1, max(2, len(buf))))])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 16))):
            i = int(rng.integers(0, len(buf)))
            buf[i] ^= 1 << int(rng.integers(0, 8))
        return kind, bytes(buf)
    if kind == "splice":
        i, j = sorted(int(x) for x in rng.integers(0, len(buf), 2))
        return kind, bytes(buf[:i] + buf[j:] + buf[i:j])
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(1, 4096)))
    if kind == "zero_run":
        i = int(rng.integers(0, len(buf)))
        n = int(rng.integers(1, 64))
        buf[i:i + n] = bytes(len(buf[i:i + n]))
        return kind, bytes(buf)
    return kind, bytes(buf) + rng.bytes(int(rng.integers(1, 64)))


# -- structural mutations on valid protobufs ----------------------------------------------------


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _dangling_input(m: onnx.ModelProto, rng) -> None:
    node = _pick(rng, m.graph.node)
    node.input[int(rng.integers(0, len(node.input)))] = "does_not_exist"


def _cycle(m: onnx.ModelProto, rng) -> None:
    nodes = m.graph.node
    i = int(rng.integers(0, len(nodes) - 1))
    j = int(rng.integers(i + 1, len(nodes)))
    data = [k for k, t in enumerate(nodes[i].input) if t not in {x.name for x in m.graph.initializer}]
    nodes[i].input[data[0] if data else 0] = nodes[j].output[0]


def _self_loop(m: onnx.ModelProto, rng) -> None:
    node = _pick(rng, m.graph.node)
    node.input[0] = node.output[0]


def _missing_initializer(m: onnx.ModelProto, rng) -> None:
    del m.graph.initializer[int(rng.integers(0, len(m.graph.initializer)))]


def _wrong_weight_shape(m: onnx.ModelProto, rng) -> None:
    inits = [t for t in m.graph.initializer if len(t.dims) >= 1 and t.data_type == TensorProto.FLOAT]
    t = _pick(rng, inits)
    arr = numpy_helper.to_array(t)
    axis = int(rng.integers(0, arr.ndim))
    if arr.shape[axis] > 1 and rng.random() < 0.5:
        arr = np.take(arr, range(arr.shape[axis] - 1), axis=axis)
    else:
        arr = np.concatenate([arr, np.take(arr, [0], axis=axis)], axis=axis)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _reshape_weight(m: onnx.ModelProto, rng) -> None:
    """Same element count, different rank: the checker is happy, the op is not."""
    inits = [t for t in m.graph.initializer if len(t.dims) >= 2]
    t = _pick(rng, inits)
    arr = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(arr.reshape(-1), t.name))


def _dynamic_dims(m: onnx.ModelProto, rng) -> None:
    inp = m.graph.input[0]
    for k, d in enumerate(inp.type.tensor_type.shape.dim):
        if k == 0 or rng.random() < 0.7:
            d.Clear()
            d.dim_param = ["N", "H", "W", "C"][min(k, 3)] if rng.random() < 0.8 else ""


def _wrong_input_shape(m: onnx.ModelProto, rng) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    d = dims[int(rng.integers(0, len(dims)))]
    d.Clear()
    d.dim_value = int(rng.integers(1, 5))


def _drop_input_shape(m: onnx.ModelProto, rng) -> None:
    m.graph.input[0].type.tensor_type.ClearField("shape")


def _bad_elem_type(m: onnx.ModelProto, rng) -> None:
    m.graph.input[0].type.tensor_type.elem_type = int(_pick(rng, [TensorProto.INT64, TensorProto.DOUBLE,
                                                                  TensorProto.FLOAT16, TensorProto.STRING, 0, 99]))


def _unknown_op(m: onnx.ModelProto, rng) -> None:
    node = _pick(rng, m.graph.node)
    node.op_type = _pick(rng, ["NotAnOp", "MyRelu"])
    node.domain = _pick(rng, ["", "com.example"])
    if node.domain and node.domain not in {o.domain for o in m.opset_import}:
        m.opset_import.append(helper.make_opsetid(node.domain, 1))


def _attr_noise(m: onnx.ModelProto, rng) -> None:
    nodes = [n for n in m.graph.node if n.attribute]
    if not nodes:
        return
    attr = _pick(rng, _pick(rng, nodes).attribute)
    if attr.type == onnx.AttributeProto.INT:
        attr.i = int(_pick(rng, [-1, 0, 2, 3, 7, 1 << 40]))
    elif attr.type == onnx.AttributeProto.INTS and len(attr.ints):
        attr.ints[int(rng.integers(0, len(attr.ints)))] = int(_pick(rng, [-3, 0, 5, 1000]))
    elif attr.type == onnx.AttributeProto.FLOAT:
        attr.f = float(_pick(rng, [np.nan, np.inf, -1.0, 0.0]))


def _drop_attr(m: onnx.ModelProto, rng) -> None:
    nodes = [n for n in m.graph.node if n.attribute]
    if nodes:
        node = _pick(rng, nodes)
        del node.attribute[int(rng.integers(0, len(node.attribute)))]


def _delete_node(m: onnx.ModelProto, rng) -> None:
    del m.graph.node[int(rng.integers(0, len(m.graph.node)))]


def _duplicate_output(m: onnx.ModelProto, rng) -> None:
    nodes = m.graph.node
    a, b = (int(x) for x in rng.choice(len(nodes), 2, replace=False))
    nodes[a].output[0] = nodes[b].output[0]


def _shuffle_nodes(m: onnx.ModelProto, rng) -> None:
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def _opset(m: onnx.ModelProto, rng) -> None:
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = int(_pick(rng, [1, 7, 10, 11, 13, 30, 999]))


def _ir_version(m: onnx.ModelProto, rng) -> None:
    m.ir_version = int(_pick(rng, [0, 1, 3, 11, 99]))


def _extra_output(m: onnx.ModelProto, rng) -> None:
    """An intermediate tensor exported as a second graph output: its channels must be kept."""
    inferred = onnx.shape_inference.infer_shapes(m).graph.value_info
    m.graph.output.append(_pick(rng, inferred))


def _missing_output(m: onnx.ModelProto, rng) -> None:
    m.graph.output[0].name = "never_produced"


def _nan_weights(m: onnx.ModelProto, rng) -> None:
    inits = [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
    t = _pick(rng, inits)
    arr = numpy_helper.to_array(t).copy()
    arr.flat[: max(1, arr.size // 3)] = _pick(rng, [np.nan, np.inf, 0.0])
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _empty_names(m: onnx.ModelProto, rng) -> None:
    for n in m.graph.node:
        n.name = ""


def _duplicate_node_names(m: onnx.ModelProto, rng) -> None:
    for n in m.graph.node:
        n.name = "same"


def _input_is_initializer(m: onnx.ModelProto, rng) -> None:
    """Old-exporter style: every initializer also listed as a graph input."""
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _float16_weights(m: onnx.ModelProto, rng) -> None:
    t = _pick(rng, [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT])
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))


def _zero_dim_input(m: onnx.ModelProto, rng) -> None:
    dims = m.graph.input[0].type.tensor_type.shape.dim
    d = dims[int(rng.integers(1, len(dims)))]
    d.Clear()
    d.dim_value = 0


def _no_outputs(m: onnx.ModelProto, rng) -> None:
    del m.graph.output[:]


def _no_inputs(m: onnx.ModelProto, rng) -> None:
    del m.graph.input[:]


def _constant_node(m: onnx.ModelProto, rng) -> None:
    """Move a weight into a Constant node (some exporters do), sometimes with a broken value."""
    t = _pick(rng, list(m.graph.initializer))
    m.graph.initializer.remove(t)
    node = helper.make_node("Constant", [], [t.name], value=t)
    if rng.random() < 0.3:
        node = helper.make_node("Constant", [], [t.name])
    m.graph.node.insert(0, node)


STRUCTURAL: dict[str, Callable[[onnx.ModelProto, np.random.Generator], None]] = {
    f.__name__.lstrip("_"): f for f in [
        _dangling_input, _cycle, _self_loop, _missing_initializer, _wrong_weight_shape, _reshape_weight,
        _dynamic_dims, _wrong_input_shape, _drop_input_shape, _bad_elem_type, _unknown_op, _attr_noise,
        _drop_attr, _delete_node, _duplicate_output, _shuffle_nodes, _opset, _ir_version, _extra_output,
        _missing_output, _nan_weights, _empty_names, _duplicate_node_names, _input_is_initializer,
        _float16_weights, _zero_dim_input, _no_outputs, _no_inputs, _constant_node,
    ]
}


def mutate_proto(model: onnx.ModelProto, rng: np.random.Generator, n: int = 1) -> tuple[list[str], onnx.ModelProto]:
    """Apply n random structural mutations to a copy of `model`."""
    m = copy.deepcopy(model)
    kinds = []
    for _ in range(n):
        kind = _pick(rng, sorted(STRUCTURAL))
        try:
            STRUCTURAL[kind](m, rng)
        except (IndexError, ValueError):
            continue  # mutation does not apply to this model (e.g. no initializers left)
        kinds.append(kind)
    return kinds, m


# -- the oracle ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # "ok" | "error"
    message: str = ""


def assert_one_line(exc: GraphpruneError) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg, repr(msg)
    return msg


def check_prune(source, target: float = 0.5, equivalence: bool = True, **kwargs) -> Outcome:
    """Run prune() on a possibly hostile input and check the contract (raises AssertionError on breach)."""
    try:
        result = graphprune.prune(source, target_flops=target, **kwargs)
    except GraphpruneError as exc:
        msg = assert_one_line(exc)
        # the input passed every check but the rewrite broke it: a graphprune bug, not a bad input
        assert not msg.startswith("pruned model"), msg
        return Outcome("error", msg)
    onnx.checker.check_model(result.model)
    if "validation_note" in result.report:
        # custom-op domains: onnxruntime cannot run the model, so neither can the equivalence check;
        # prune() validated it with the checker + strict shape inference and said so
        assert result.report["validation"] == ["checker", "shape inference", "channel agreement"]
        return Outcome("ok")
    if equivalence:
        assert_equivalent(source, result, kwargs.get("input_shape"))
    return Outcome("ok")


def assert_equivalent(source, result, input_shape=None, atol: float = 1e-3) -> None:
    """The pruned model computes what the consumer-masked original computes."""
    from graphprune.frontends.onnx_frontend import load_onnx
    from graphprune.rewrite.masking import mask_consumers_onnx
    from graphprune.rewrite.validate import random_feed, run_onnx

    loaded = load_onnx(source, input_shape)
    feed = random_feed(loaded.proto, loaded.graph, seed=3)
    ref = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)
    got = run_onnx(result.model, feed)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        # NaN/Inf weights: masking computes NaN * 0 = NaN for a removed channel the pruned model
        # no longer has, so only positions finite in both are comparable
        finite = np.isfinite(r) & np.isfinite(g)
        np.testing.assert_allclose(g[finite], r[finite], atol=atol, rtol=atol)


def save_bytes(path: str | os.PathLike, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return os.fspath(path)
