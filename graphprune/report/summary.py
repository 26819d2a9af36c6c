"""The prune report: one JSON-ready dict (for machines) and a rich table view (for people)."""
from __future__ import annotations

from typing import Any

from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan


def group_rows(analysis: Analysis, removed: frozenset[int] = frozenset(),
               ignored: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """One row per channel group: size, kept, state (prunable, frozen or ignored) and reason, member
    layers, MAC share. `ignored` maps the classes --ignore protects to why (passes.allocate.ignore_reasons)."""
    ignored = ignored or {}
    total_macs = analysis.macs() or 1.0
    tensor_macs: dict[str, float] = {}
    for term in analysis.mac_terms:
        for t in term.tensors:
            tensor_macs[t] = tensor_macs.get(t, 0.0) + term.base
    producers, joins = _group_structure(analysis)
    rows = []
    for g in analysis.groups:
        kept = sum(1 for r in g.classes if r not in removed)
        share = sum(tensor_macs.get(t, 0.0) for t in g.tensors) / total_macs
        free = [r for r in g.classes if not analysis.is_frozen(r)]
        held = [r for r in free if r in ignored]
        whole = not g.frozen and bool(free) and len(held) == len(free)
        reason = g.reason if g.reason is not None or not held else ignored[held[0]]
        rows.append({
            "id": g.id,
            "channels": g.size,
            "kept": kept,
            "frozen": g.frozen,
            "frozen_channels": g.frozen_classes,
            "ignored": whole,
            "ignored_channels": len(held),
            "state": "frozen" if g.frozen else "ignored" if whole else "prunable",
            "reason": reason,
            "layers": g.nodes,
            "tensors": g.tensors,
            "macs_share": round(share, 6),
            "producers": sorted(producers.get(g.id, ())),
            "joins": sorted(joins.get(g.id, ())),
        })
    return rows


def _group_structure(analysis: Analysis) -> tuple[dict[int, set[str]], dict[int, set[str]]]:
    """Why a group exists: the ops that write its channels, and the ops that merge two of its tensors.

    A join (a residual Add, a gating Mul) is what ties several producers' channels into one group.
    """
    producers: dict[int, set[str]] = {}
    for b in analysis.bindings:
        if b.role == "out" and b.tensor in analysis.roots:
            for gid in _tensor_groups(analysis, b.tensor):
                producers.setdefault(gid, set()).add(b.node)
    joins: dict[int, set[str]] = {}
    graph = analysis.graph
    for node in graph.nodes:
        seen: dict[int, int] = {}
        for t in dict.fromkeys(node.inputs):
            if t and not graph.is_const(t) and t in analysis.roots:
                for gid in _tensor_groups(analysis, t):
                    seen[gid] = seen.get(gid, 0) + 1
        for gid, n in seen.items():
            if n >= 2:
                joins.setdefault(gid, set()).add(node.name)
    return producers, joins


def _tensor_groups(analysis: Analysis, tensor: str) -> set[int]:
    return {analysis.group_of[r] for r in set(analysis.roots[tensor].tolist()) if r in analysis.group_of}


def _scored_by(coverage: dict[str, Any] | None) -> dict[int, str]:
    if not coverage:
        return {}
    out = {g: coverage["method"] for g in coverage["scored_groups"]}
    for fb in coverage["fallbacks"]:
        out.update({g: fb["to"] for g in fb["groups"]})
    return out


def build_report(analysis: Analysis, plan: Plan, *, method: str, strategy: str, round_to: int,
                 times: dict[str, float], source: str | None = None,
                 coverage: dict[str, Any] | None = None, ignored: dict[int, str] | None = None,
                 warnings: list[str] | None = None) -> dict[str, Any]:
    """`coverage` (passes.methods.method_coverage): which groups the method scored, which fell back;
    `ignored`: the classes --ignore protects and why (passes.allocate.ignore_reasons)."""
    macs0, macs1 = analysis.macs(), analysis.macs(plan.removed)
    params0, params1 = analysis.params(), analysis.params(plan.removed)
    achieved = {"macs": macs1 / macs0 if macs0 else 1.0, "params": params1 / params0 if params0 else 1.0}
    target_kind = plan.kind if plan.kind in achieved else "macs"
    by = _scored_by(coverage)
    return {
        "source": source,
        "method": method,
        "strategy": strategy,
        "round_to": round_to,
        "target": {"kind": plan.kind, "fraction": plan.target},
        "achieved": achieved[target_kind] if plan.kind in achieved else plan.achieved,
        "target_error": abs((achieved[target_kind] if plan.kind in achieved else plan.achieved) - plan.target),
        "macs": {"before": macs0, "after": macs1, "ratio": achieved["macs"]},
        "params": {"before": params0, "after": params1, "ratio": achieved["params"]},
        "channels": {
            "groups": len(analysis.groups),
            "prunable_groups": len(analysis.prunable_groups),
            "removed": len(plan.removed),
            "total": sum(g.size for g in analysis.groups),
        },
        "frozen_ops": dict(analysis.ctx.frozen_nodes),
        "norm_channels": norm_note(analysis, plan.removed),
        "cost_model": cost_note(analysis),
        "target_met": bool((achieved[target_kind] if plan.kind in achieved else plan.achieved) <= plan.target + 1e-9),
        "method_coverage": coverage,
        "groups": [dict(r, scored_by=by.get(r["id"])) for r in group_rows(analysis, plan.removed, ignored)],
        "warnings": list(warnings or []),
        "time": {k: round(v, 4) for k, v in times.items()},
    }


# the reason normalization() gives when it freezes channels a norm takes statistics over
NORM_FREEZE_REASON = "normalises across channels"


def norm_note(analysis: Analysis, removed: frozenset[int]) -> dict[str, Any]:
    """What happened to channels a LayerNorm normalises over: with "freeze", how many groups stayed
    whole for that reason (the first reason recorded); with "prune", which norms now take their
    statistics over the kept channels only (the semantics the masked reference checks)."""
    mode = analysis.ctx.norm_channels
    if mode == "freeze":
        held = [g for g in analysis.groups if g.frozen and g.reason and NORM_FREEZE_REASON in g.reason]
        return {"mode": mode, "frozen_groups": len(held), "frozen_channels": sum(g.size for g in held)}
    masks = analysis.keep_masks(removed)
    stats = analysis.ctx.norm_stats_nodes
    return {"mode": mode, "norm_ops": len(stats),
            "stats_over_kept": sorted(n for n, x in stats.items() if not masks[x].all())}


def cost_note(analysis: Analysis) -> dict[str, Any]:
    """What the MAC count covers: exact over counted ops, and which ops it could not count."""
    unknown = dict(analysis.ctx.unknown_costs)
    return {
        "counted_ops": len({m.node for m in analysis.mac_terms}),
        "uncounted_ops": unknown,
        "exact": not unknown,
        "note": ("MACs of every op that multiplies weights or activations are counted"
                 if not unknown else
                 f"ratios are exact over counted MACs only: {len(unknown)} op(s) have an unknown cost"),
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def unique_suffixes(names: list[str]) -> dict[str, str]:
    """Each name's shortest ending (at a '/' boundary, or '.' in names without '/') that no other name ends with.

    '/layer3/layer3.0/conv1/Conv' next to '/layer4/layer4.0/conv1/Conv' becomes 'layer3.0/conv1/Conv':
    narrow tables then show what tells layers apart instead of the prefix they all share.
    """
    def endings(name: str) -> list[str]:
        sep = "/" if "/" in name else "."
        cuts = [i + 1 for i, ch in enumerate(name) if ch == sep and 0 < i + 1 < len(name)]
        out = [name[i:] for i in reversed(cuts)]
        return [e for e in out if e.strip("/.")] + [name]

    counts: dict[str, int] = {}
    for name in set(names):
        for e in set(endings(name)):
            counts[e] = counts.get(e, 0) + 1
    return {name: next((e for e in endings(name) if counts[e] == 1), name) for name in names}


def render_tables(report: dict[str, Any], console: Any, max_groups: int | None = 20) -> None:
    """Print the group table (largest MAC share first, `max_groups` rows; None for all), then the
    summary, so the result is the last thing on screen however long the table is."""
    from rich.table import Table

    from graphprune.escape import markup

    rows = sorted(report["groups"], key=lambda r: -r["macs_share"])
    shown = rows if max_groups is None else rows[:max_groups]
    short = unique_suffixes([n for r in report["groups"] for n in r["layers"]])
    # "scored by" only when some group fell back to another criterion: the table stays within 80 columns
    by_col = any((r.get("scored_by") or report["method"]) != report["method"] for r in shown)
    groups = Table(title="channel groups (largest MAC share first)", show_header=True)
    for col in ("group", "ch", "kept", "MACs", "state", *(["scored by"] if by_col else []), "layers"):
        groups.add_column(col, justify="right" if col in ("group", "ch", "kept", "MACs") else "left",
                          overflow="fold")
    for r in shown:
        if r["frozen"]:
            state = "frozen: " + (r["reason"] or "")
        elif r.get("ignored"):
            state = "ignored: " + (r["reason"] or "")
        else:
            state = "prunable"
            if r.get("ignored_channels"):
                state += f" ({r['ignored_channels']} ignored: {r['reason']})"
        layers = ", ".join(short[n] for n in r["layers"][:2]) + (f" +{len(r['layers']) - 2}" if len(r["layers"]) > 2 else "")
        # names come from the model file: never markup, never control characters
        cells = [str(r["id"]), str(r["channels"]), str(r["kept"]), f"{r['macs_share']:.1%}", markup(state)]
        if by_col:
            cells.append(r.get("scored_by") or "-")
        groups.add_row(*cells, markup(layers) or "-")
    console.print(groups)
    if len(rows) > len(shown):
        console.print(f"... {len(rows) - len(shown)} more groups (--groups N or --all to list them, --json for everything)")
    if report.get("recovery"):
        render_recovery(report, console)
    elif report.get("channels", {}).get("removed") and report.get("target", {}).get("kind") is not None:
        # no calibration data: nothing repairs the pruned layers, and the default speed order spends the
        # budget where time is, not where importance is lowest (docs/methods.md measures what that costs)
        console.print("recovery: none (no calibration data). Without --calib the pruned layers are not repaired and "
                      "accuracy can drop sharply; pass --calib DATA (activation-aware importance + least-squares "
                      "recovery), or --strategy global to rank by importance alone (docs/methods.md).")

    cm = report.get("cost_model") or {}
    if cm.get("uncounted_ops"):
        console.print(f"[yellow]{cm['note']}: {', '.join(list(cm['uncounted_ops'])[:5])}[/yellow]")
    cov = report.get("method_coverage")
    if cov:
        n = len(cov["scored_groups"]) + sum(len(fb["groups"]) for fb in cov["fallbacks"])
        line = f"method {cov['method']} scored {len(cov['scored_groups'])} of {n} prunable groups"
        for fb in cov["fallbacks"]:
            line += f"; {len(fb['groups'])} fell back to {fb['to']} ({fb['why']})"
        console.print(line)
    summary = Table(title="graphprune result", show_header=True)
    summary.add_column("metric")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_column("kept", justify="right")
    for key, label in (("macs", "MACs (FLOPs)"), ("params", "parameters")):
        d = report[key]
        summary.add_row(label, _human(d["before"]), _human(d["after"]), f"{d['ratio']:.2%}")
    lat = report.get("latency")
    if lat:
        summary.add_row(f"latency ms ({lat['backend']})", f"{lat['before_ms']:.2f}", f"{lat['after_ms']:.2f}",
                        f"{lat['ratio']:.2%}")
    console.print(summary)
    t = report["target"]
    predicted = f" (measured; predicted {lat['predicted_ratio']:.2%})" if lat and "predicted_ratio" in lat else ""
    console.print(
        f"target {t['kind']} {t['fraction']:.2%}  achieved {report['achieved']:.2%}{predicted}  "
        f"error {report['target_error']:.3%}  method {markup(report['method'])}/{report['strategy']}  "
        f"round_to {report.get('round_to')} ({report.get('round_to_source', 'user')})  "
        f"time {report['time'].get('total_s', 0):.2f}s"
    )
    if lat and "speedup" in lat:
        console.print(f"[bold]speed-up {lat['speedup']:.2f}x[/] measured ({lat['backend']}, {lat['threads']} thread, "
                      f"{lat['rounds']} interleaved rounds{', ' + lat['clock'] if lat.get('clock') else ''})  vs  FLOPs reduction {lat['flops_speedup']:.2f}x")
    if report.get("target_met") is False:
        console.print("[yellow]target not met: this is the floor (--allow-floor)[/yellow]")
    norm = report.get("norm_channels") or {}
    if norm.get("frozen_groups"):
        console.print(f"{norm['frozen_groups']} channel group(s) ({norm['frozen_channels']} channels) kept whole: a "
                      "LayerNorm normalises over them (--norm-channels prune makes them prunable)")
    elif norm.get("stats_over_kept"):
        console.print(f"{len(norm['stats_over_kept'])} LayerNorm op(s) now take their statistics over the kept "
                      "channels only (--norm-channels prune)")


def render_recovery(report: dict[str, Any], console: Any, max_layers: int = 40) -> None:
    """Calibration, recovery mode, per-layer reconstruction error and held-out agreement."""
    from rich.table import Table

    cal, rec = report.get("calibration", {}), report["recovery"]
    times = report.get("time", {})
    console.print(
        f"calibration {cal.get('samples', 0)} samples ({cal.get('fit_samples', 0)} fit, "
        f"{cal.get('heldout_samples', 0)} held out) from {cal.get('source')}  recovery {rec['mode']}  "
        f"time {times.get('calib_s', 0) + times.get('recover_s', 0):.1f}s"
    )
    layers = rec.get("layers") or []
    if layers:
        t = Table(title=f"least-squares reconstruction ({rec.get('lsq_samples')} samples)", show_header=True)
        for col in ("layer", "op", "inputs kept", "rel. error before", "after"):
            t.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for r in layers[:max_layers]:
            t.add_row(r["layer"], r["op"], f"{r['inputs_kept']}/{r['inputs']}", f"{r['rel_err_before']:.4f}",
                      f"{r['rel_err_after']:.4f}")
        console.print(t)
        if len(layers) > max_layers:
            console.print(f"... {len(layers) - max_layers} more layers (use --json for all)")
    agree = rec.get("agreement")
    if agree:
        for o in agree["outputs"]:
            top1 = f"  top-1 agreement {o['top1_agreement']:.2%}" if "top1_agreement" in o else ""
            console.print(f"held-out agreement ({agree['samples']} samples) on '{o.get('name', 'output')}': "
                          f"cosine {o['cosine']:.4f}  relative L2 {o['rel_l2']:.4f}{top1}")
