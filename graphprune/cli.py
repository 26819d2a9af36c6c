"""Command-line entry point: a thin layer over the public Python API (graphprune.api)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from graphprune.cli_backend import bench, tune
from graphprune.cli_common import EXIT_USAGE, fail, parse_shape, run_guarded
from graphprune.cli_inspect import inspect
from graphprune.errors import GraphpruneError


class _DefaultToPrune(click.Group):
    """`graphprune model.onnx ...` means `graphprune prune model.onnx ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphprune")
def main() -> None:
    """graphprune: structured channel pruning with measured speed-ups.

    \b
    graphprune model.onnx --target-flops 0.4 -o slim.onnx
    graphprune demo
    """


def _progress_printer(enabled: bool):
    if not enabled:
        return None, None
    from rich.console import Console

    console = Console(stderr=True)
    status = console.status("starting")
    status.start()
    return status, (lambda msg: status.update(msg))


def _terminate_as_interrupt() -> None:
    """SIGTERM (a pipeline's timeout, `kill`) unwinds like Ctrl-C, so a half-written temp file is removed."""
    import signal

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave signal handling to the host
        return
    click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to write the pruned ONNX model.")
@click.option("--target-flops", type=float, help="Fraction of MACs (FLOPs) to keep, e.g. 0.4.")
@click.option("--target-params", type=float, help="Fraction of parameters to keep.")
@click.option("--target-latency", type=float, help="Fraction of measured latency to keep.")
@click.option("--method", default="l1", show_default=True,
              help="Importance criterion: l1, l2, bn_scale, fpgm or random; or di, a structure search that needs "
                   "--calib. (hfp, ssr and hbfp train while they prune: run them from Python, docs/methods.md.)")
@click.option("--strategy", type=click.Choice(["global", "uniform"]), default="global", show_default=True)
@click.option("--round-to", type=int, default=1, show_default=True, help="Keep channel counts multiples of N.")
@click.option("--ignore", multiple=True, help="Node or parameter name (glob) whose channels are never pruned.")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib", type=click.Path(dir_okay=False), help="Calibration data for data-driven methods (di): .npz with x, y.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of tables.")
@click.option("--report", "report_html", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--overwrite", is_flag=True, help="Allow -o to be the input file.")
@click.option("--dry-run", is_flag=True, help="Plan and validate; write no model (--report still writes its page).")
@click.option("--groups", "max_groups", type=click.IntRange(min=0), default=20, show_default=True,
              help="Rows of the group table (largest MAC share first).")
@click.option("--all", "all_groups", is_flag=True, help="List every group in the table.")
def prune(model: str, output: str | None, target_flops: float | None, target_params: float | None,
          target_latency: float | None, method: str, strategy: str, round_to: int, ignore: tuple[str, ...],
          input_shape: str | None, seed: int, calib: str | None, as_json: bool, report_html: str | None, overwrite: bool,
          dry_run: bool, max_groups: int, all_groups: bool) -> None:
    """Prune MODEL (ONNX) to a FLOPs/params/latency target and write a validated slim model."""
    from graphprune import api

    if output is None and not dry_run:
        fail("missing -o/--output (or pass --dry-run)")
    targets = {"--target-flops": target_flops, "--target-params": target_params, "--target-latency": target_latency}
    given = {flag: v for flag, v in targets.items() if v is not None}
    if not given:
        fail("give a target: --target-flops, --target-params or --target-latency")
    if len(given) > 1:
        fail(f"give exactly one of --target-flops, --target-params, --target-latency (got {', '.join(given)})")
    for flag, value in given.items():
        if not 0 < value <= 1:
            fail(f"{flag} is the fraction to keep, in (0, 1]; got {value:g}")
    if output and os.path.exists(model) and os.path.exists(output) and os.path.samefile(model, output) and not overwrite:
        fail(f"output {output} is the input file; pass --overwrite to replace it")
    _terminate_as_interrupt()
    shapes = run_guarded(parse_shape, input_shape)
    status, say = _progress_printer(not as_json and sys.stderr.isatty())
    try:
        result = run_guarded(
            api.prune, model, target_flops=target_flops, target_params=target_params,
            target_latency=target_latency, method=method, strategy=strategy, round_to=round_to,
            ignore=ignore, seed=seed, input_shape=shapes, progress=say, calib=calib,
        )
        written = []
        if output and not dry_run:
            run_guarded(result.save, output)
            result.report["output"] = output
            written.append(output)
        if report_html:
            from graphprune.report.html import write_html_report

            run_guarded(write_html_report, result, report_html)
            written.append(report_html)
    finally:
        if status is not None:
            status.stop()
    for warning in result.report.get("warnings", []):
        click.echo(f"graphprune: warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=float))
    else:
        from rich.console import Console

        from graphprune.report.summary import render_tables

        render_tables(result.report, Console(), None if all_groups else max_groups)
    # what happened to the files, last: on stdout with the tables, on stderr when stdout is JSON
    for path in written:
        click.echo(f"wrote {path}", err=as_json)
    if dry_run:
        click.echo("dry run: no model written" if written else "dry run: nothing written", err=as_json)


@main.command()
@click.option("--out-dir", type=click.Path(file_okay=False), default="graphprune-demo", show_default=True)
@click.option("--target-flops", type=float, default=0.4, show_default=True)
def demo(out_dir: str, target_flops: float) -> None:
    """Prune the built-in example CNN end to end and check it against consumer-side masking."""
    import numpy as np

    from graphprune import api
    from graphprune.examples import example_cnn
    from graphprune.io import write_model_atomic
    from graphprune.rewrite.masking import mask_consumers_onnx
    from graphprune.rewrite.validate import random_feed, run_onnx
    from graphprune.frontends.onnx_frontend import load_onnx

    os.makedirs(out_dir, exist_ok=True)
    src = os.path.join(out_dir, "example.onnx")
    dst = os.path.join(out_dir, "example_slim.onnx")
    write_model_atomic(example_cnn(), src)
    result = run_guarded(api.prune, src, target_flops=target_flops)
    result.save(dst)
    loaded = load_onnx(src)
    feed = random_feed(loaded.proto, loaded.graph, seed=1)
    ref = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    got = run_onnx(result.model, feed)[0]
    from rich.console import Console

    from graphprune.report.summary import render_tables

    render_tables(result.report, Console())
    diff = float(np.abs(ref - got).max())
    click.echo(f"example model: {src}\npruned model:  {dst}\nmax |pruned - masked original| = {diff:.2e}")
    if diff > 1e-4:
        fail(f"equivalence check failed (max diff {diff:.2e})")


main.add_command(inspect)
main.add_command(bench)
main.add_command(tune)

__all__ = ["main", "fail", "run_guarded", "parse_shape", "EXIT_USAGE"]

if __name__ == "__main__":  # pragma: no cover
    main()
