"""Validate a rewritten model before anything is written: checker, shape inference, onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, shape_inference

from graphprune.errors import GraphpruneError
from graphprune.ir.graph import Graph


def compared_constants(proto: onnx.ModelProto) -> dict[str, list[float]]:
    """Per graph input: the constants the model compares it with (Equal, possibly after a Cast),
    at any depth. A scalar such as a sample rate that must be 8000 or 16000 is fed one of these."""
    consts = {t.name: t for t in proto.graph.initializer}
    found: dict[str, list[float]] = {}
    inputs = {i.name for i in proto.graph.input}

    def walk(graph: onnx.GraphProto, alias: dict[str, str]) -> None:
        local = dict(alias)
        for n in graph.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        consts[n.output[0]] = a.t
            if n.op_type in ("Cast", "Identity", "Squeeze", "Reshape") and n.input and n.input[0] in local:
                local[n.output[0]] = local[n.input[0]]
            if n.op_type == "Equal" and len(n.input) == 2:
                for x, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                    if x in local and c in consts:
                        value = onnx.numpy_helper.to_array(consts[c]).ravel()
                        if value.size == 1:
                            found.setdefault(local[x], []).append(float(value[0]))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, local)

    walk(proto.graph, {i: i for i in inputs})
    return found


def random_feed(proto: onnx.ModelProto, graph: Graph, seed: int = 0,
                values: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Inputs shaped as analysed (dynamic batch pinned to 1), deterministic for a seed.

    `values` fixes an input to a value (--input-value); a single-element integer input the model
    compares with constants (an enum such as a sample rate) gets the first such constant.
    """
    rng = np.random.default_rng(seed)
    feed = {}
    names = {i.name for i in proto.graph.input}
    for name in values or {}:
        if name not in names:
            raise GraphpruneError(f"--input-value names '{name}', which is not a model input ({', '.join(sorted(names))})")
    enums = compared_constants(proto)
    for inp in proto.graph.input:
        shape = graph.shape(inp.name)
        if shape is None:
            raise GraphpruneError(f"cannot build a test input for '{inp.name}': unknown shape")
        np_type = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if values and inp.name in values:
            feed[inp.name] = np.full(shape, values[inp.name]).astype(np_type)
        elif int(np.prod(shape)) == 1 and not np.issubdtype(np_type, np.floating) and enums.get(inp.name):
            feed[inp.name] = np.full(shape, enums[inp.name][0]).astype(np_type)
        elif np.issubdtype(np_type, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(np_type)
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(np_type)
    return feed


def run_onnx(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as one GraphpruneError line, not ORT's log
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def custom_domains(model: onnx.ModelProto) -> list[str]:
    """Op domains onnxruntime cannot run without the user's custom-op library."""
    standard = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    return sorted({n.domain for n in model.graph.node if n.domain not in standard})


def validate(model: onnx.ModelProto, feed: dict[str, np.ndarray], expected_shapes: list[tuple[int, ...]],
             run: bool = True) -> onnx.ModelProto:
    """Return the shape-inferred skeleton, or raise GraphpruneError saying which check failed.

    run=False skips the onnxruntime stage (models with custom-op domains); the output shapes are
    then checked against strict shape inference instead.

    Checker and shape inference run on a weightless skeleton (weights become typed inputs), which
    checks the same structure without serialising every weight twice.
    """
    from graphprune.frontends.onnx_frontend import skeleton

    light, _ = skeleton(model)
    try:
        onnx.checker.check_model(light)
    except Exception as exc:
        raise GraphpruneError(f"pruned model failed the ONNX checker: {str(exc).splitlines()[0][:200]}") from None
    try:
        inferred = shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise GraphpruneError(f"pruned model failed shape inference: {str(exc).splitlines()[0][:200]}") from None
    if run:
        try:
            outputs = run_onnx(model, feed)
        except Exception as exc:
            raise GraphpruneError(f"pruned model failed to run in onnxruntime: {str(exc).splitlines()[0][:200]}") from None
        got = [tuple(o.shape) for o in outputs]
    else:
        from graphprune.frontends.onnx_frontend import _shape_of

        declared = {vi.name: _shape_of(vi) for vi in list(inferred.graph.output) + list(inferred.graph.value_info)}
        got = [declared.get(o.name) for o in model.graph.output]
        if any(g is None for g in got):
            return inferred  # dynamic output dims: nothing static to compare
        batch = [tuple(s)[0] for s in expected_shapes]
        got = [(b,) + tuple(g[1:]) for b, g in zip(batch, got)]
    if got != [tuple(s) for s in expected_shapes]:
        raise GraphpruneError(f"pruned model output shapes {got} differ from the original {expected_shapes}")
    return inferred
