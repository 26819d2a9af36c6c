"""Fold run-time-computed Slice/Split bounds (Shape -> Gather -> Div ... chains) into IR constants.

Exporters spell `x.chunk(2, dim=1)` as Slice whose bounds are computed from Shape(x). With static
shapes the bounds are known, so the analysis can treat them as constants; the rewriter then writes
constant bounds for the pruned tensor. A fold is accepted only if the bound subgraph is closed
(its values feed nothing but these bounds), so a Shape read elsewhere still freezes channels.
"""
from __future__ import annotations

import numpy as np
import onnx

from graphprune.ir.graph import Graph, Node

BOUND_INPUTS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Reshape": (1,), "Resize": (3,)}
COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "And": np.logical_and, "Or": np.logical_or,
           "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}
FOLDABLE = {"Shape", "Size", "Identity", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub", "Mul", "Div",
            "Not", "Slice", *COMPARE}


def _axes(node: Node, values: list) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return [int(a) for a in np.ravel(values[1])] if len(values) > 1 and values[1] is not None else None


def _eval(node: Node, vals: list[np.ndarray | None], graph: Graph,
          shapes: dict[str, tuple[int, ...]] | None = None) -> np.ndarray | None:
    op = node.op_type
    a = vals[0] if vals else None
    if op == "Shape":
        shape = (shapes or {}).get(node.inputs[0]) or graph.shape(node.inputs[0])
        if shape is None:
            return None
        s = np.array(shape, dtype=np.int64)
        return s[int(node.attrs.get("start", 0)): node.attrs.get("end")]
    if any(v is None for v in vals if v is not ...):
        return None
    if op == "Identity":
        return a
    if op == "Cast":
        to = node.attrs.get("to")
        return a.astype(bool) if to == 9 else a
    if op == "Gather":
        return np.take(a, vals[1].astype(np.int64), axis=int(node.attrs.get("axis", 0)))
    if op == "Unsqueeze":
        out = a
        for ax in sorted(_axes(node, vals) or []):
            out = np.expand_dims(out, ax)
        return out
    if op == "Squeeze":
        axes = _axes(node, vals)
        return np.squeeze(a, axis=tuple(axes)) if axes else np.squeeze(a)
    if op == "Concat":
        return np.concatenate([np.atleast_1d(v) for v in vals], axis=int(node.attrs.get("axis", 0)))
    if op in ("Add", "Sub", "Mul"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, vals[1])
    if op == "Size":
        return np.array(a.size, dtype=np.int64)
    if op in COMPARE:
        return COMPARE[op](a, vals[1])
    if op == "Not":
        return np.logical_not(a)
    if op == "Slice" and len(vals) >= 3 and a.ndim == 1:
        step = int(np.ravel(vals[4])[0]) if len(vals) > 4 and vals[4] is not None else 1
        return a[int(np.ravel(vals[1])[0]):int(np.ravel(vals[2])[0]):step]
    if op == "Div":
        b = vals[1]
        if np.issubdtype(a.dtype, np.integer):
            return (np.trunc(a / b)).astype(a.dtype)
        return a / b
    return None


def shape_value(graph: Graph, tensor: str, visited: set[str] | None = None, depth: int = 0,
                shapes: dict[str, tuple[int, ...]] | None = None, recompute: bool = False) -> np.ndarray | None:
    """The value of a small tensor computed from constants and static shapes, or None.

    `visited` collects the nodes the value was computed through; `shapes` overrides tensor shapes
    (the pruned ones), and `recompute` re-evaluates folded values instead of reading the fold.
    """
    visited = set() if visited is None else visited
    if tensor in graph.constants and not (recompute and graph.producer(tensor) is not None):
        return graph.constants[tensor]
    if depth > 32:
        return None
    node = graph.producer(tensor)
    if node is None or node.op_type not in FOLDABLE or node.outputs[0] != tensor:
        return None
    if node.op_type == "Shape":
        vals: list = []
    else:
        vals = [shape_value(graph, t, visited, depth + 1, shapes, recompute) if t else None for t in node.inputs]
        if any(v is None for v, t in zip(vals, node.inputs) if t):
            return None
    try:
        out = _eval(node, vals, graph, shapes)
    except Exception:  # noqa: BLE001 - anything numpy rejects is simply not foldable
        return None
    if out is not None:
        visited.add(node.name)
    return out


def fold_bounds(graph: Graph) -> None:
    """Turn computable Slice/Split bounds and Reshape targets into constants of the IR (never of the
    written model). Each computation is folded only if closed: its values feed nothing but bounds."""
    bound_consumers = {n.name for n in graph.nodes if n.op_type in BOUND_INPUTS}
    found: dict[str, tuple[np.ndarray, set[str]]] = {}  # bound tensor -> (value, nodes computing it)
    for node in graph.nodes:
        for idx in BOUND_INPUTS.get(node.op_type, ()):
            t = node.inputs[idx] if idx < len(node.inputs) else ""
            if not t or t in graph.constants or t in found:
                continue
            visited: set[str] = set()
            value = shape_value(graph, t, visited)
            if value is not None and visited:
                found[t] = (value, visited)
    # computations may share nodes (one Shape read feeding several targets): drop, until none is
    # left to drop, every computation whose nodes feed anything besides accepted computations and bounds
    while True:
        inside = set().union(*(v for _, v in found.values())) if found else set()
        open_ = [t for t, (_, v) in found.items()
                 if any(c.name not in inside and c.name not in bound_consumers
                        for name in v for out in graph.node_by_name[name].outputs for c in graph.consumers(out))]
        if not open_:
            break
        for t in open_:
            del found[t]
    for t, (value, visited) in found.items():
        graph.constants[t] = np.asarray(value, dtype=np.int64)
        graph.folded_nodes.update(visited)


def fold_dequantized_weights(graph: Graph) -> None:
    """DequantizeLinear of constant integers (a QDQ model's weights and biases) becomes a float
    constant of the IR, so the float rules see a weight; the written model keeps the integers.

    Bindings on the folded tensor are forwarded (graph.aliases) to the integer tensor and to a
    per-channel scale / zero point along the same axis; per-tensor ones are left as they are.
    """
    for node in graph.nodes:
        if node.op_type == "Identity" and node.inputs[0] in graph.aliases and node.outputs[0] not in graph.constants:
            value = graph.constants[node.inputs[0]]
            graph.constants[node.outputs[0]] = value
            graph.aliases[node.outputs[0]] = [(node.inputs[0], tuple(range(value.ndim)))]
            graph.folded_nodes.add(node.name)
            continue
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        ins = [t for t in node.inputs if t]
        if not all(t in graph.constants for t in ins) or node.outputs[0] in graph.constants:
            continue
        q = graph.constants[node.inputs[0]]
        scale = graph.constants[node.inputs[1]]
        zp = graph.constants[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
        if q.ndim == 0 or scale.ndim > 1 or (zp is not None and zp.shape != scale.shape):
            continue  # blocked quantisation: not handled
        axis = int(node.attrs.get("axis", 1)) % q.ndim
        view = [1] * q.ndim
        if scale.size > 1:
            if scale.shape[0] != q.shape[axis]:
                continue
            view[axis] = scale.size
        zero = 0 if zp is None else zp.astype(np.float64).reshape(view)
        value = (q.astype(np.float64) - zero) * scale.astype(np.float64).reshape(view)
        out = node.outputs[0]
        graph.constants[out] = value.astype(scale.dtype)
        maps = [(node.inputs[0], tuple(range(q.ndim)))]
        if scale.size > 1:
            follow = tuple(0 if a == axis else None for a in range(q.ndim))
            maps += [(t, follow) for t in node.inputs[1:3] if t]
        graph.aliases[out] = maps
        graph.folded_nodes.add(node.name)


# pure ops whose all-constant instances are folded into initializers of the model that gets rewritten
FOLD_OPS = frozenset({
    "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Flatten", "Cast", "Identity", "Add", "Sub", "Mul", "Div",
    "Neg", "Sqrt", "Reciprocal", "Pow", "Exp", "Concat", "Gather", "Slice", "Expand", "Tile", "Range",
    "ConstantOfShape", "Shape", "Size", "Squeeze", "Clip", "Max", "Min", "Abs", "Equal", "Not", "Where",
})
FOLD_LIMIT = 1 << 22  # elements: a fold must not blow a small constant up into a huge one


def fold_constant_nodes(model: onnx.ModelProto) -> int:
    return fold_graph_constants(model.graph, list(model.opset_import))


def fold_graph_constants(graph: onnx.GraphProto, opsets: list) -> int:
    """Replace ops whose inputs are all initializers by their value (exporters' bias reshapes, scale
    arithmetic), so the rules see constants instead of freezing at a Reshape of a constant.

    Dequantisation is never folded (the written model stays quantised), nor ops with subgraphs or
    outside the pure FOLD_OPS set. Returns how many nodes were folded.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from graphprune.frontends.external import is_mapped

    values = {t.name: t for t in graph.initializer}
    keep: list[onnx.NodeProto] = []
    folded_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        ins = [i for i in node.input if i]
        if (node.op_type not in FOLD_OPS or node.domain not in ("", "ai.onnx") or not ins
                or any(i not in values for i in ins) or len(node.output) != 1):
            keep.append(node)
            continue
        try:
            if any(is_mapped(values[i]) for i in ins):
                raise ValueError("a memory-mapped weight is not folded")  # folding would copy it into memory
            arrays = {i: numpy_helper.to_array(values[i]) for i in ins}
            tiny = helper.make_graph([node], "fold", [], [helper.make_empty_tensor_value_info(node.output[0])],
                                     initializer=[values[i] for i in ins])
            out = ReferenceEvaluator(helper.make_model(tiny, opset_imports=opsets)).run(None, {})[0]
            if np.asarray(out).size > max(FOLD_LIMIT, max(a.size for a in arrays.values())):
                raise ValueError("fold too large")
        except Exception:  # noqa: BLE001 - anything the evaluator cannot do simply stays an op
            keep.append(node)
            continue
        tensor = numpy_helper.from_array(np.asarray(out), node.output[0])
        graph.initializer.append(tensor)
        values[tensor.name] = tensor
        folded_nodes.append(node)
    folded = len(folded_nodes)
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        # an initializer that only fed folded nodes is dropped (reads inside subgraphs count, at any depth)
        fed = {i for n in folded_nodes for i in n.input}
        used = _reads(graph) | {o.name for o in graph.output}
        live = [t for t in graph.initializer if t.name not in fed or t.name in used]
        if len(live) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(live)
    return folded


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node of `graph` or of any subgraph inside it."""
    names: set[str] = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names |= _reads(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    names |= _reads(g)
    return names
