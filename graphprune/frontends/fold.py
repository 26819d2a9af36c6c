"""Fold run-time-computed Slice/Split bounds (Shape -> Gather -> Div ... chains) into IR constants.

Exporters spell `x.chunk(2, dim=1)` as Slice whose bounds are computed from Shape(x). With static
shapes the bounds are known, so the analysis can treat them as constants; the rewriter then writes
constant bounds for the pruned tensor. A fold is accepted only if the bound subgraph is closed
(its values feed nothing but these bounds), so a Shape read elsewhere still freezes channels.
"""
from __future__ import annotations

import numpy as np

from graphprune.ir.graph import Graph, Node

BOUND_INPUTS = {"Slice": (1, 2, 3, 4), "Split": (1,)}
COMPARE = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "And": np.logical_and, "Or": np.logical_or,
           "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal}
FOLDABLE = {"Shape", "Size", "Identity", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat", "Add", "Sub", "Mul", "Div",
            "Not", *COMPARE}


def _axes(node: Node, values: list) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    return [int(a) for a in np.ravel(values[1])] if len(values) > 1 and values[1] is not None else None


def _eval(node: Node, vals: list[np.ndarray | None], graph: Graph) -> np.ndarray | None:
    op = node.op_type
    a = vals[0] if vals else None
    if op == "Shape":
        shape = graph.shape(node.inputs[0])
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
    if op == "Div":
        b = vals[1]
        if np.issubdtype(a.dtype, np.integer):
            return (np.trunc(a / b)).astype(a.dtype)
        return a / b
    return None


def shape_value(graph: Graph, tensor: str, visited: set[str] | None = None, depth: int = 0) -> np.ndarray | None:
    """The value of a small tensor computed from constants and static shapes, or None.

    `visited` collects the nodes the value was computed through.
    """
    visited = set() if visited is None else visited
    if tensor in graph.constants:
        return graph.constants[tensor]
    if depth > 32:
        return None
    node = graph.producer(tensor)
    if node is None or node.op_type not in FOLDABLE or node.outputs[0] != tensor:
        return None
    if node.op_type == "Shape":
        vals: list = []
    else:
        vals = [shape_value(graph, t, visited, depth + 1) if t else None for t in node.inputs]
        if any(v is None for v, t in zip(vals, node.inputs) if t):
            return None
    try:
        out = _eval(node, vals, graph)
    except Exception:  # noqa: BLE001 - anything numpy rejects is simply not foldable
        return None
    if out is not None:
        visited.add(node.name)
    return out


def fold_bounds(graph: Graph) -> None:
    """Turn computable Slice/Split bound operands into constants of the IR (never of the written model)."""
    candidates: dict[str, set[str]] = {}  # bound tensor -> nodes computing it
    cache: dict[str, np.ndarray | None] = {}

    def evaluate(tensor: str, visited: set[str], depth: int = 0) -> np.ndarray | None:
        return shape_value(graph, tensor, visited, depth)

    for node in graph.nodes:
        for idx in BOUND_INPUTS.get(node.op_type, ()):
            if idx >= len(node.inputs) or not node.inputs[idx] or node.inputs[idx] in graph.constants:
                continue
            visited: set[str] = set()
            value = evaluate(node.inputs[idx], visited)
            if value is None:
                continue
            candidates[node.inputs[idx]] = visited
            cache[node.inputs[idx]] = value
    if not candidates:
        return
    all_nodes = set().union(*candidates.values())
    bound_consumers = {n.name for n in graph.nodes if n.op_type in BOUND_INPUTS}
    closed = True
    for name in all_nodes:
        for out in graph.node_by_name[name].outputs:
            for c in graph.consumers(out):
                if c.name not in all_nodes and c.name not in bound_consumers:
                    closed = False
    if not closed:
        return
    for tensor, value in cache.items():
        graph.constants[tensor] = np.asarray(value, dtype=np.int64)
    graph.folded_nodes.update(all_nodes)
