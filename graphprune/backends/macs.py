"""MAC counting over Conv/Gemm/MatMul after ONNX shape inference.

Deliberately small: only the layers that dominate CNN cost are counted, which is what the
FLOPs ratio next to a measured speed-up needs. The core team may replace it with an IR-based count.
"""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _prod(dims: list[int | None]) -> int:
    if any(d is None for d in dims):
        raise ValueError("unknown dimension")
    return math.prod(dims)  # type: ignore[arg-type]


def count_macs(model: onnx.ModelProto | str | Path) -> int:
    """Multiply-accumulates of one inference; dynamic batch dims count as 1."""
    proto = shape_inference.infer_shapes(_load(model))
    shapes = _shapes(proto)
    total = 0
    for node in proto.graph.node:
        try:
            if node.op_type in ("Conv", "ConvTranspose"):
                total += _conv_macs(node, shapes)
            elif node.op_type == "Gemm":
                a = shapes[node.input[0]]
                b = shapes[node.input[1]]
                trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
                trans_b = next((at.i for at in node.attribute if at.name == "transB"), 0)
                m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
                n = b[0] if trans_b else b[1]
                total += _prod([m or 1, k, n])
            elif node.op_type == "MatMul":
                a = shapes[node.input[0]]
                out = shapes[node.output[0]]
                total += _prod([d or 1 for d in out]) * _prod([a[-1]])
        except (KeyError, ValueError, IndexError):
            continue  # shape unknown: skip rather than guess
    return total


def _conv_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int:
    w = shapes[node.input[1]]  # Conv: [Cout, Cin/g, kh, kw]; ConvTranspose: [Cin, Cout/g, kh, kw]
    if node.op_type == "Conv":
        out = shapes[node.output[0]]
        spatial = [d or 1 for d in [out[0], *out[2:]]]
        return _prod(spatial) * _prod(w)
    inp = shapes[node.input[0]]
    spatial = [d or 1 for d in [inp[0], *inp[2:]]]
    return _prod(spatial) * _prod(w)
