"""The dependency graph as Graphviz DOT and as SVG, coloured by channel group.

Nodes are ops, edges are tensors coloured/labelled with the group(s) of the channels they carry;
frozen tensors and ops are grey with the reason as tooltip. SVG comes from Graphviz `dot` when it
is installed; otherwise from a small layered layout here, so the views never depend on Graphviz.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from typing import Any

from graphprune.report.inspect import FROZEN_GREY, group_color

MAX_EDGE_COLORS = 6


def _short(name: str, limit: int = 28) -> str:
    """'/layer1/layer1.0/downsample/downsample.0/Conv' -> 'layer1.0/downsample.0' (the op type is shown apart)."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1:
        parts = parts[:-1]
    parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    s = "/".join(parts[-2:]) if parts else name
    return s if len(s) <= limit else "…" + s[-(limit - 1):]


def edge_label(edge: dict[str, Any]) -> str:
    """'g4 256ch' for one group, 'g1+g3+… (12 groups) 416ch' for a concat of many."""
    gs = edge["groups"]
    if not gs:
        return "layout" if edge["layout"] else ""
    ids = [f"g{x['group']}" for x in gs]
    head = "+".join(ids[:3]) + ("+…" if len(ids) > 3 else "")
    more = f" ({len(ids)} groups)" if len(ids) > 3 else ""
    return f"{head}{more} {edge['channels']}ch"


def edge_tooltip(edge: dict[str, Any]) -> str:
    lines = [f"tensor {edge['tensor']}"]
    for x in edge["groups"][:12]:
        lines.append(f"group {x['group']}: {x['channels']} channels, {x['kept']} kept")
    if len(edge["groups"]) > 12:
        lines.append(f"... {len(edge['groups']) - 12} more groups")
    if edge["frozen"]:
        lines.append(f"frozen: {edge['reason'] or 'unknown'}")
    return "\n".join(lines)


def edge_colors(edge: dict[str, Any], frozen_groups: set[int]) -> list[str]:
    if edge["frozen"] or not edge["groups"]:
        return [FROZEN_GREY]
    return [FROZEN_GREY if x["group"] in frozen_groups else group_color(x["group"]) for x in edge["groups"][:MAX_EDGE_COLORS]]


def node_tooltip(node: dict[str, Any]) -> str:
    s = f"{node['op']} {node['label']}"
    return s + (f"\nfrozen: {node['frozen']}" if node["frozen"] else "")


def _frozen_groups(view: dict[str, Any]) -> set[int]:
    return {r["id"] for r in view.get("groups", []) if r["frozen"]}


def _dq(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(view: dict[str, Any]) -> str:
    """Graphviz DOT of an inspect dict (see graphprune.report.inspect.inspect_analysis)."""
    graph = view["graph"]
    frozen = _frozen_groups(view)
    ids = {n["id"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
    out = [
        "digraph graphprune {",
        "  rankdir=TB; nodesep=0.25; ranksep=0.35;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10, fillcolor="#ffffff", color="#444444"];',
        '  edge [fontname="Helvetica", fontsize=8, arrowsize=0.6];',
    ]
    for n in graph["nodes"]:
        attrs = {
            "label": f"{n['op']}\n{_short(n['label'])}",
            "tooltip": node_tooltip(n),
            "class": "frozen" if n["frozen"] else "op",
        }
        if n["kind"] != "op":
            attrs["shape"] = "ellipse"
        if n["frozen"]:
            attrs["fillcolor"] = "#e0e0e0"
            attrs["fontcolor"] = "#555555"
        out.append(f"  {ids[n['id']]} [{', '.join(f'{k}={_dq(v)}' for k, v in attrs.items())}];")
    for e in graph["edges"]:
        colors = edge_colors(e, frozen)
        attrs = {
            "color": ":".join(colors),
            "fontcolor": colors[0],
            "label": edge_label(e),
            "tooltip": edge_tooltip(e),
            "class": " ".join(f"g{x['group']}" for x in e["groups"]) or "plain",
        }
        if e["frozen"]:
            attrs["style"] = "dashed"
        out.append(f"  {ids[e['src']]} -> {ids[e['dst']]} [{', '.join(f'{k}={_dq(v)}' for k, v in attrs.items())}];")
    out.append("}")
    return "\n".join(out) + "\n"


def graphviz_svg(dot_text: str, timeout: float = 60.0) -> str | None:
    """SVG from Graphviz `dot`, or None when it is missing or fails."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", "replace")


def strip_prolog(svg: str) -> str:
    """Drop the XML declaration, DOCTYPE and comments so an SVG can be inlined into HTML."""
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


# -- own layered layout (no Graphviz) ----------------------------------------------------------
NODE_H, LAYER_GAP, NODE_GAP, CHAR_W, MARGIN = 30, 58, 18, 6.2, 20


def _layers(graph: dict[str, Any]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Longest-path layer of every node (nodes come in topological order) and its predecessors."""
    preds: dict[str, list[str]] = {n["id"]: [] for n in graph["nodes"]}
    for e in graph["edges"]:
        preds[e["dst"]].append(e["src"])
    layer: dict[str, int] = {}
    for n in graph["nodes"]:
        layer[n["id"]] = 1 + max((layer[p] for p in preds[n["id"]] if p in layer), default=-1)
    return layer, preds


def edge_span(graph: dict[str, Any]) -> int:
    """Sum of layers crossed by all edges: what makes Graphviz slow (DenseNet's concat fan-in)."""
    layer, _ = _layers(graph)
    return sum(abs(layer[e["dst"]] - layer[e["src"]]) for e in graph["edges"])


def _layout(graph: dict[str, Any]) -> tuple[dict[str, tuple[float, float, float]], float, float]:
    """Longest-path layers, barycentre ordering; returns id -> (x_center, y_top, width)."""
    layer, preds = _layers(graph)
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for n in graph["nodes"]:
        by_layer.setdefault(layer[n["id"]], []).append(n)
    pos: dict[str, tuple[float, float, float]] = {}
    width = 0.0
    for li in sorted(by_layer):
        row = by_layer[li]

        def want(n: dict[str, Any]) -> float:
            xs = [pos[p][0] for p in preds[n["id"]] if p in pos]
            return sum(xs) / len(xs) if xs else 0.0

        row.sort(key=want)
        x_right = MARGIN
        y = MARGIN + li * (NODE_H + LAYER_GAP)
        for n in row:
            w = max(70.0, CHAR_W * max(len(n["op"]), len(_short(n["label"]))) + 16)
            x_left = max(x_right, want(n) - w / 2)
            pos[n["id"]] = (x_left + w / 2, y, w)
            x_right = x_left + w + NODE_GAP
        width = max(width, x_right)
    height = MARGIN * 2 + (max(by_layer, default=0) + 1) * (NODE_H + LAYER_GAP)
    return pos, width + MARGIN, height


def layered_svg(view: dict[str, Any]) -> str:
    """A self-contained SVG of the graph with a simple layered layout (used when Graphviz is absent)."""
    graph = view["graph"]
    frozen = _frozen_groups(view)
    pos, width, height = _layout(graph)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gp-graph" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="gp-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
        '<g class="edges">',
    ]
    for e in graph["edges"]:
        x1, y1, _ = pos[e["src"]]
        x2, y2, _ = pos[e["dst"]]
        y1 += NODE_H
        mid = (y1 + y2) / 2
        colors = edge_colors(e, frozen)
        classes = " ".join(f"g{x['group']}" for x in e["groups"]) or "plain"
        dash = ' stroke-dasharray="5,3"' if e["frozen"] else ""
        wdt = 1.2 + min(3.0, (e["channels"] or 0) / 512)
        parts.append(
            f'<g class="edge {classes}"><title>{esc(edge_tooltip(e))}</title>'
            f'<path d="M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2:.1f}" fill="none" '
            f'stroke="{colors[0]}" stroke-width="{wdt:.1f}"{dash} marker-end="url(#gp-arrow)"/>'
        )
        if y2 - y1 <= LAYER_GAP + 1 and e["groups"]:
            parts.append(
                f'<text x="{(x1 + x2) / 2 + 4:.1f}" y="{mid + 3:.1f}" font-size="8" fill="{colors[0]}">{esc(edge_label(e))}</text>'
            )
        parts.append("</g>")
    parts.append('</g><g class="nodes">')
    for n in graph["nodes"]:
        cx, y, w = pos[n["id"]]
        fill, stroke, ink = ("#e0e0e0", FROZEN_GREY, "#555") if n["frozen"] else ("#ffffff", "#444", "#111")
        rx = NODE_H / 2 if n["kind"] != "op" else 6
        parts.append(
            f'<g class="node{" frozen" if n["frozen"] else ""}"><title>{esc(node_tooltip(n))}</title>'
            f'<rect x="{cx - w / 2:.1f}" y="{y:.1f}" width="{w:.1f}" height="{NODE_H}" rx="{rx:.0f}" fill="{fill}" stroke="{stroke}"/>'
            f'<text x="{cx:.1f}" y="{y + 12:.1f}" font-size="10" text-anchor="middle" font-weight="bold" fill="{ink}">{esc(n["op"])}</text>'
            f'<text x="{cx:.1f}" y="{y + 24:.1f}" font-size="8" text-anchor="middle" fill="{ink}">{esc(_short(n["label"]))}</text></g>'
        )
    parts.append("</g></svg>")
    return "\n".join(parts)


# above this many crossed layers, dot takes minutes (densenet121: ~24000, over 100 s on 2 cores)
GRAPHVIZ_MAX_SPAN = 3000


def render_svg(view: dict[str, Any], use_graphviz: bool = True) -> str:
    """SVG of the graph: Graphviz when available, wanted and fast enough, else the built-in layout."""
    if use_graphviz and edge_span(view["graph"]) <= GRAPHVIZ_MAX_SPAN:
        svg = graphviz_svg(to_dot(view))
        if svg is not None:
            return strip_prolog(svg)
    return layered_svg(view)

