"""Inspect a dependency analysis: the groups and the op graph, as one JSON-ready dict.

Users need to see *why* channels were grouped (which ops write them, which join them) and *why*
some are frozen; the table, JSON, DOT/SVG and HTML views are all rendered from this one dict.
"""
from __future__ import annotations

from typing import Any

from graphprune.analysis.groups import Analysis
from graphprune.report.summary import group_rows

FROZEN_GREY = "#9e9e9e"


def group_color(gid: int) -> str:
    """A stable, well-spread colour per group id (golden-angle hues)."""
    import colorsys

    h = (gid * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(h, 0.42, 0.7)
    return "#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255))


def tensor_groups(analysis: Analysis, tensor: str, removed: frozenset[int] = frozenset()) -> list[dict[str, int]]:
    """Groups whose channels a tensor carries, largest first: [{group, channels, kept}]."""
    roots = analysis.roots.get(tensor)
    if roots is None:
        return []
    out: dict[int, list[int]] = {}
    for r in roots.tolist():
        gid = analysis.group_of.get(r)
        if gid is None:
            continue
        c = out.setdefault(gid, [0, 0])
        c[0] += 1
        c[1] += r not in removed
    return [{"group": g, "channels": c[0], "kept": c[1]} for g, c in sorted(out.items(), key=lambda kv: (-kv[1][0], kv[0]))]


def graph_view(analysis: Analysis, removed: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Nodes (ops plus model inputs/outputs) and edges (tensors), each edge with the groups it carries."""
    graph = analysis.graph
    frozen_ops = analysis.ctx.frozen_nodes
    groups = {g.id: g for g in analysis.groups}
    skip = set(graph.folded_nodes)
    nodes: list[dict[str, Any]] = []
    for t in graph.inputs:
        if not graph.is_const(t):
            nodes.append({"id": f"input:{t}", "op": "Input", "kind": "input", "label": t, "frozen": "model input"})
    for n in graph.nodes:
        if n.name in skip:
            continue
        nodes.append({"id": n.name, "op": n.op_type, "kind": "op", "label": n.name, "frozen": frozen_ops.get(n.name)})
    for t in graph.outputs:
        nodes.append({"id": f"output:{t}", "op": "Output", "kind": "output", "label": t, "frozen": "model output"})
    known = {n["id"] for n in nodes}

    def source(t: str) -> str | None:
        p = graph.producer(t)
        if p is not None and p.name in known:
            return p.name
        return f"input:{t}" if f"input:{t}" in known else None

    edges: list[dict[str, Any]] = []
    def add_edge(t: str, dst: str) -> None:
        src = source(t)
        if src is None:
            return
        gs = tensor_groups(analysis, t, removed)
        frozen_gs = [x["group"] for x in gs if groups[x["group"]].frozen]
        reason = next((groups[g].reason for g in frozen_gs if groups[g].reason), None)
        space = analysis.ctx.spaces.get(t)
        layout = space is not None and space.axis is None
        if layout and t not in analysis.permute_internal:
            reason = reason or f"reshaped layout at '{t}'"
        edges.append({
            "tensor": t, "src": src, "dst": dst, "groups": gs,
            "channels": sum(x["channels"] for x in gs) if gs else None,
            "kept": sum(x["kept"] for x in gs) if gs else None,
            "frozen": bool(gs) and len(frozen_gs) == len(gs) or (layout and t not in analysis.permute_internal),
            "reason": reason, "layout": layout,
        })

    for n in graph.nodes:
        if n.name in skip:
            continue
        for t in dict.fromkeys(x for x in n.inputs if x and not graph.is_const(x)):
            add_edge(t, n.name)
    for t in graph.outputs:
        add_edge(t, f"output:{t}")
    return {"nodes": nodes, "edges": edges}


def inspect_analysis(analysis: Analysis, removed: frozenset[int] = frozenset(), source: str | None = None) -> dict[str, Any]:
    """Everything the inspect views show, JSON-ready."""
    rows = group_rows(analysis, removed)
    for r in rows:
        r["color"] = FROZEN_GREY if r["frozen"] else group_color(r["id"])
    return {
        "source": source,
        "summary": {
            "groups": len(rows),
            "prunable_groups": sum(1 for r in rows if not r["frozen"]),
            "frozen_groups": sum(1 for r in rows if r["frozen"]),
            "channels": sum(r["channels"] for r in rows),
            "frozen_channels": sum(r["frozen_channels"] for r in rows),
            "ops": len(analysis.graph.nodes),
            "macs": analysis.macs(),
            "params": analysis.params(),
        },
        "groups": rows,
        "frozen_ops": dict(analysis.ctx.frozen_nodes),
        "uncounted_cost_ops": dict(analysis.ctx.unknown_costs),
        "graph": graph_view(analysis, removed),
    }


__all__ = ["inspect_analysis", "graph_view", "tensor_groups", "group_color", "FROZEN_GREY"]
