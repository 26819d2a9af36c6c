"""A one-file HTML report of a prune run: costs before/after, channels kept per layer, the group graph,
the settings, and what froze which channels. Everything is inline (CSS, JS, SVG): no network.
"""
from __future__ import annotations

import html
import json
import os
from importlib import resources
from typing import Any

from graphprune.analysis.groups import Analysis
from graphprune.io import write_bytes_atomic
from graphprune.report.graph_svg import _short, render_svg
from graphprune.report.inspect import FROZEN_GREY, group_color, inspect_analysis

esc = html.escape


def _asset(name: str) -> str:
    return resources.files("graphprune.report").joinpath("assets", name).read_text(encoding="utf-8")


def script_safe_json(value: Any) -> str:
    """JSON that cannot leave or confuse a <script> element, whatever names the model holds.

    Inside script data an HTML parser reacts to `</` (end tag), and to `<!--` followed by
    `<script` (the "double escaped" state that swallows the rest of the page). Escaping every `<`
    and `>` as a JSON unicode escape removes all of them; U+2028/2029 are escaped for old JS parsers.
    """
    text = json.dumps(value, default=float)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def layer_channels(analysis: Analysis, removed: frozenset[int]) -> list[dict[str, Any]]:
    """Per layer that writes channels (a producer's filters): channels before and kept, and its group."""
    masks = analysis.keep_masks(removed)
    seen: set[str] = set()
    rows = []
    for b in analysis.bindings:
        if b.role != "out" or b.node in seen or b.tensor not in analysis.roots:
            continue
        seen.add(b.node)
        roots = analysis.roots[b.tensor].tolist()
        gids = sorted({analysis.group_of[r] for r in roots if r in analysis.group_of})
        frozen = all(analysis.groups[g].frozen for g in gids) if gids else True
        rows.append({"layer": b.node, "before": len(roots), "kept": int(masks[b.tensor].sum()),
                     "groups": gids, "frozen": frozen})
    order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    rows.sort(key=lambda r: order.get(r["layer"], 0))
    return rows


def channels_chart(rows: list[dict[str, Any]]) -> str:
    """Horizontal bar chart (inline SVG): grey = channels before, coloured = kept."""
    if not rows:
        return '<p class="note">No layer writes prunable channels.</p>'
    row_h, label_w, bar_w, right = 16, 200, 560, 90
    top = 18
    width, height = label_w + bar_w + right, top + row_h * len(rows) + 6
    most = max(r["before"] for r in rows) or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="channels kept per layer">',
           f'<text x="{label_w}" y="11">0</text><text x="{label_w + bar_w}" y="11" text-anchor="end">{most} channels</text>']
    for i, r in enumerate(rows):
        y = top + i * row_h
        w0 = max(1.0, bar_w * r["before"] / most)
        w1 = bar_w * r["kept"] / most
        color = FROZEN_GREY if r["frozen"] else group_color(r["groups"][0])
        tip = f"{r['layer']}: {r['kept']} of {r['before']} channels kept (group {', '.join(map(str, r['groups']))})"
        out.append(
            f'<g class="row"><title>{esc(tip)}</title>'
            f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{esc(_short(r["layer"], 32))}</text>'
            f'<rect class="bar-before" x="{label_w}" y="{y + 2}" width="{w0:.1f}" height="{row_h - 4}" fill="#e6e6e6"/>'
            f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{max(w1, 0.5):.1f}" height="{row_h - 4}" fill="{color}"/>'
            f'<text x="{label_w + w0 + 5:.1f}" y="{y + 11}">{r["kept"]}/{r["before"]}</text></g>'
        )
    out.append("</svg>")
    return "\n".join(out)


def _cards(report: dict[str, Any]) -> str:
    cards = []
    for key, label in (("macs", "MACs (FLOPs)"), ("params", "Parameters")):
        d = report[key]
        cards.append((label, f"{_human(d['before'])} → {_human(d['after'])}", f"{d['ratio']:.1%} kept"))
    lat = report.get("latency")
    if lat:
        cards.append((f"Latency ({lat.get('backend', '')})", f"{lat['before_ms']:.2f} → {lat['after_ms']:.2f} ms",
                      f"{lat['ratio']:.1%} of before"))
    ch = report.get("channels", {})
    if ch:
        cards.append(("Channels removed", f"{ch['removed']} / {ch['total']}",
                      f"{ch['prunable_groups']} of {ch['groups']} groups prunable"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div><div class="r">{esc(r)}</div></div>'
        for k, v, r in cards) + "</div>"


def _settings(report: dict[str, Any]) -> str:
    t = report.get("target", {})
    items = [
        ("model", report.get("source")), ("output", report.get("output")),
        ("target", f"{t.get('kind')} {t.get('fraction', 0):.2%} kept" if t else None),
        ("achieved", f"{report['achieved']:.2%} (error {report['target_error']:.3%})" if "achieved" in report else None),
        ("method", report.get("method")), ("strategy", report.get("strategy")), ("round_to", report.get("round_to")),
    ]
    for k, v in report.get("time", {}).items():
        items.append((f"time {k}", f"{v:.3f}"))
    for k, v in report.get("settings", {}).items() if isinstance(report.get("settings"), dict) else ():
        items.append((k, v))
    return "<table>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in items if v is not None) + "</table>"


def _groups_table(groups: list[dict[str, Any]]) -> str:
    head = "<tr><th>group</th><th>channels</th><th>kept</th><th>MACs share</th><th>state</th><th>written by</th><th>joined by</th><th>members</th></tr>"
    body = []
    for r in groups:
        state = f"frozen: {r['reason']}" if r["frozen"] else "prunable"
        if not r["frozen"] and r["frozen_channels"]:
            state += f" ({r['frozen_channels']} frozen: {r['reason']})"
        body.append(
            f'<tr class="grp{" frozen" if r["frozen"] else ""}" data-group="{r["id"]}">'
            f'<td><span class="swatch" style="background:{r["color"]}"></span>g{r["id"]}</td>'
            f'<td class="num">{r["channels"]}</td><td class="num">{r["kept"]}</td><td class="num">{r["macs_share"]:.1%}</td>'
            f'<td>{esc(state)}</td><td>{esc(", ".join(r["producers"]))}</td><td>{esc(", ".join(r["joins"]))}</td>'
            f'<td title="{esc(", ".join(r["layers"]))}">{len(r["layers"])}</td></tr>'
        )
    return f'<div class="scroll"><table id="groups">{head}{"".join(body)}</table></div>'


def _frozen(view: dict[str, Any]) -> str:
    frozen_groups = [r for r in view["groups"] if r["frozen"] or r["frozen_channels"]]
    parts = ['<p class="note">Channels are frozen (never removed) when an op cannot be proven to map channels '
             "one to one, when a constraint ties them to a model input or output, or when a layout op spreads "
             "them over several axes. The op and the reason:</p>"]
    if view["frozen_ops"]:
        parts.append("<table id=\"frozen-ops\"><tr><th>op</th><th>why it froze its channels</th></tr>" + "".join(
            f"<tr><td>{esc(n)}</td><td>{esc(w)}</td></tr>" for n, w in view["frozen_ops"].items()) + "</table>")
    else:
        parts.append('<p class="note">No op was frozen by the analysis; only the constraints below apply.</p>')
    parts.append("<table id=\"frozen-groups\"><tr><th>group</th><th>frozen channels</th><th>reason</th><th>members</th></tr>" + "".join(
        f"<tr><td>g{r['id']}</td><td class=\"num\">{r['frozen_channels']} / {r['channels']}</td><td>{esc(r['reason'] or '')}</td>"
        f"<td>{esc(', '.join(r['layers'][:6]) + (' …' if len(r['layers']) > 6 else ''))}</td></tr>"
        for r in frozen_groups) + "</table>")
    return "".join(parts)


def _recovery(report: dict[str, Any]) -> str:
    """Calibration and recovery: what the data-driven passes changed, layer by layer, and how close
    the pruned model stays to the original on held-out calibration samples."""
    rec = report.get("recovery")
    if not rec:
        return ""
    cal, times = report.get("calibration", {}), report.get("time", {})
    spent = float(times.get("calib_s", 0) or 0) + float(times.get("recover_s", 0) or 0)
    parts = [f'<p>calibration {esc(str(cal.get("samples", 0)))} samples ({esc(str(cal.get("fit_samples", 0)))} fit, '
             f'{esc(str(cal.get("heldout_samples", 0)))} held out) from {esc(str(cal.get("source")))} · '
             f'recovery <b>{esc(str(rec.get("mode")))}</b> · {spent:.1f} s</p>']
    agree = rec.get("agreement")
    if agree:
        rows = "".join(
            f'<tr><td>{esc(str(o.get("name", "output")))}</td><td class="num">{o["cosine"]:.4f}</td>'
            f'<td class="num">{o["rel_l2"]:.4f}</td><td class="num">'
            f'{format(o["top1_agreement"], ".2%") if "top1_agreement" in o else "-"}</td></tr>'
            for o in agree.get("outputs", []))
        parts.append(f'<table id="agreement"><tr><th>output ({esc(str(agree.get("samples")))} held-out samples)</th>'
                     f"<th>cosine</th><th>relative L2</th><th>top-1 agreement</th></tr>{rows}</table>")
    layers = rec.get("layers") or []
    if layers:
        rows = "".join(
            f'<tr><td>{esc(str(r["layer"]))}</td><td>{esc(str(r["op"]))}</td>'
            f'<td class="num">{r["inputs_kept"]}/{r["inputs"]}</td><td class="num">{r["rel_err_before"]:.4f}</td>'
            f'<td class="num">{r["rel_err_after"]:.4f}</td></tr>' for r in layers)
        parts.append(f'<div class="scroll"><table id="reconstruction"><tr><th>layer</th><th>op</th><th>inputs kept</th>'
                     f"<th>relative error before</th><th>after least squares</th></tr>{rows}</table></div>")
    return '<section id="recovery"><h2>Calibration recovery</h2>' + "".join(parts) + "</section>"


def render_html_report(result: Any, use_graphviz: bool = True) -> str:
    """The report as one HTML string (see write_html_report)."""
    report: dict[str, Any] = result.report
    analysis: Analysis = result.analysis
    removed = frozenset(result.plan.removed)
    view = inspect_analysis(analysis, removed, source=report.get("source"))
    graph_svg = render_svg(view, use_graphviz=use_graphviz)
    title = f"graphprune report: {os.path.basename(str(report.get('source') or 'model'))}"
    t = report.get("target", {})
    sub = (f"target {t.get('kind')} {t.get('fraction', 0):.0%} · method {report.get('method')} / "
           f"{report.get('strategy')} · round_to {report.get('round_to')}") if t else ""
    data = script_safe_json({k: v for k, v in report.items() if k != "groups"})
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{esc(title)}</title><style>{_asset("report.css")}</style></head>
<body><header><h1>{esc(title)}</h1><div class="sub">{esc(sub)}</div></header><main>
<section id="summary"><h2>Before / after</h2>{_cards(report)}</section>
<section id="channels"><h2>Channels kept per layer</h2>
<p class="note">Grey: channels before; coloured (by group): kept. Grey bars only: frozen.</p>
{channels_chart(layer_channels(analysis, removed))}</section>
<section id="groups-section"><h2>Channel groups</h2>
<p class="note">A group is a set of channels that must be removed together: every op that writes them
("written by") is pruned alike because an op joins their tensors ("joined by", e.g. a residual Add).
Click a row to highlight its tensors in the graph.
<label><input type="checkbox" id="only-frozen"> frozen only</label></p>
{_groups_table(view["groups"])}</section>
<section id="frozen"><h2>Frozen channels</h2>{_frozen(view)}</section>
<section id="graph"><h2>Dependency graph</h2>
<p class="note">Nodes are ops, edges are tensors coloured and labelled by the group of the channels they carry
(hover for channels kept); grey dashed: frozen, with the reason in the tooltip.</p>
<div class="gp-graph-wrap scroll">{graph_svg}</div></section>
{_recovery(report)}
<section id="settings"><h2>Settings</h2>{_settings(report)}</section>
<script type="application/json" id="report-data">{data}</script>
<script>{_asset("report.js")}</script>
</main></body></html>
"""


def write_html_report(result: Any, path: str | os.PathLike, use_graphviz: bool = True) -> None:
    """Write the report for a PruneResult atomically (complete file or untouched)."""
    write_bytes_atomic(render_html_report(result, use_graphviz).encode("utf-8"), path)
