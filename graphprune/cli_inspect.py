"""`graphprune inspect`: show the channel groups of a model and why they exist (table, JSON, DOT, SVG)."""
from __future__ import annotations

import json
from typing import Any

import click

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS, NORM_CHANNELS
from graphprune.cli_common import parse_shape, run_guarded


def render_inspect_table(view: dict[str, Any], console: Any, max_groups: int | None = 60) -> None:
    """Groups as a rich table (members, channels, MAC share, frozen state and why), the frozen ops,
    then the one-line summary last, where it stays on screen."""
    from rich.table import Table

    from graphprune.escape import markup
    from graphprune.report.summary import unique_suffixes

    names = [n for r in view["groups"] for key in ("layers", "producers", "joins") for n in r[key]]
    short = unique_suffixes(names)

    def few(items: list[str], n: int = 2) -> str:
        # names come from the model file: never markup, never control characters
        if not items:
            return "-"
        return ", ".join(markup(short.get(x, x)) for x in items[:n]) + (f" +{len(items) - n}" if len(items) > n else "")

    table = Table(title="channel groups", show_header=True, show_lines=False)
    for col in ("group", "ch", "MACs", "state", "written by", "joined by", "members"):
        table.add_column(col, justify="right" if col in ("group", "ch", "MACs") else "left", overflow="fold")
    rows = view["groups"] if max_groups is None else view["groups"][:max_groups]
    for r in rows:
        state = f"[grey50]frozen: {markup(r['reason'])}[/]" if r["frozen"] else f"[{r['color']}]prunable[/]"
        if not r["frozen"] and r["frozen_channels"]:
            state += f" ({r['frozen_channels']} frozen: {markup(r['reason'])})"
        members = few(r["layers"], 2)
        table.add_row(str(r["id"]), str(r["channels"]), f"{r['macs_share']:.1%}", state,
                      few(r["producers"]), few(r["joins"]), f"{len(r['layers'])}: {members}" if r["layers"] else "-")
    console.print(table)
    if len(view["groups"]) > len(rows):
        console.print(f"... {len(view['groups']) - len(rows)} more groups (--groups N or --all to list them, "
                      "--json for everything)")
    if view["frozen_ops"]:
        frozen = Table(title="frozen ops", show_header=True)
        frozen.add_column("op", overflow="fold")
        frozen.add_column("why", overflow="fold")
        for name, why in view["frozen_ops"].items():
            frozen.add_row(markup(name), markup(why))
        console.print(frozen)
    s = view["summary"]
    console.print(
        f"[bold]{markup(view.get('source') or 'model')}[/]: {s['ops']} ops, {s['groups']} channel groups "
        f"({s['prunable_groups']} prunable, {s['frozen_groups']} frozen), {s['channels']} channels "
        f"({s['frozen_channels']} frozen)"
    )


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups and graph as JSON on stdout.")
@click.option("--dot", "dot_path", type=click.Path(dir_okay=False), help="Write the dependency graph as Graphviz DOT.")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False), help="Write the dependency graph as SVG.")
@click.option("--no-graphviz", is_flag=True, help="Lay out the SVG with the built-in layout even if `dot` exists.")
@click.option("--groups", "max_groups", type=click.IntRange(min=0), default=60, show_default=True,
              help="Rows of the group table.")
@click.option("--all", "show_all", is_flag=True, help="List every group in the table.")
@click.option("--norm-channels", type=click.Choice(list(NORM_CHANNELS)), default=DEFAULT_NORM_CHANNELS,
              show_default=True, help="As for prune: whether channels a LayerNorm normalises over are prunable.")
def inspect(model: str, input_shape: str | None, as_json: bool, dot_path: str | None, svg_path: str | None,
            no_graphviz: bool, max_groups: int, show_all: bool, norm_channels: str) -> None:
    """Show MODEL's channel groups: members, channels, FLOPs share, and what froze them."""
    from graphprune.api import inspect as inspect_model
    from graphprune.outputs import OutputGate

    gate = run_guarded(OutputGate, [model])
    for path, what in ((dot_path, "--dot"), (svg_path, "--svg")):
        if path:
            run_guarded(gate.claim, path, what)
    shapes = run_guarded(parse_shape, input_shape)
    view = run_guarded(inspect_model, model, input_shape=shapes, norm_channels=norm_channels)
    if dot_path or svg_path:
        from graphprune.report.graph_svg import render_svg, to_dot

        if dot_path:
            run_guarded(gate.write_text, dot_path, to_dot(view))
        if svg_path:
            run_guarded(gate.write_text, svg_path, render_svg(view, use_graphviz=not no_graphviz))
    if as_json:
        click.echo(json.dumps(view, indent=1, default=float))
        return
    from rich.console import Console

    render_inspect_table(view, Console(), None if show_all else max_groups)
    for path in (dot_path, svg_path):
        if path:
            click.echo(f"wrote {path}")
