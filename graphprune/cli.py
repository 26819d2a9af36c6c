"""Command-line entry point: a thin layer over the public Python API (graphprune.api)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from graphprune.errors import GraphpruneError

EXIT_USAGE = 2


class _DefaultToPrune(click.Group):
    """`graphprune model.onnx ...` means `graphprune prune model.onnx ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


def fail(message: str) -> None:
    """One line on stderr, exit code 2: the contract for every bad input."""
    click.echo(f"graphprune: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def run_guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except GraphpruneError as exc:
        code = getattr(exc, "exit_code", EXIT_USAGE)
        if code != EXIT_USAGE:
            click.echo(f"graphprune: error: {exc}", err=True)
            sys.exit(code)
        fail(str(exc))
    except KeyboardInterrupt:
        click.echo("graphprune: interrupted; no output written", err=True)
        sys.exit(130)


def parse_shape(value: str | None) -> dict[str, tuple[int, ...]] | None:
    """'1,3,224,224' or 'input=1,3,224,224;mask=1,1,224,224'."""
    if not value:
        return None
    out: dict[str, tuple[int, ...]] = {}
    try:
        for i, part in enumerate(value.split(";")):
            name, _, dims = part.rpartition("=")
            out[name or f"#{i}"] = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise GraphpruneError(f"bad --input-shape {value!r}: expected e.g. 1,3,224,224") from None
    if any(d <= 0 for dims in out.values() for d in dims):
        raise GraphpruneError(f"bad --input-shape {value!r}: dims must be positive")
    if list(out) == ["#0"]:
        return {"": out["#0"]}
    return out


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
@click.option("--method", default="l1", show_default=True, help="Importance: l1, l2, bn_scale, fpgm, random, di, ...")
@click.option("--strategy", type=click.Choice(["global", "uniform"]), default="global", show_default=True)
@click.option("--round-to", default="auto", show_default=True,
              help="Keep channel counts multiples of N; auto: the multiple measured fast on --hardware.")
@click.option("--hardware", type=click.Choice(["ort-cpu", "cuda-fp16"]), default="ort-cpu", show_default=True,
              help="Whose channel table --round-to auto uses.")
@click.option("--no-measure", is_flag=True, help="Skip timing original vs pruned on onnxruntime.")
@click.option("--min-speedup", type=float, help="Fail (exit 3, nothing written) if the measured speed-up is below X.")
@click.option("--ignore", multiple=True, help="Node or parameter name (glob) whose channels are never pruned.")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib", type=click.Path(dir_okay=False), help="Calibration data for data-driven methods (di): .npz with x, y.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of tables.")
@click.option("--report", "report_html", type=click.Path(dir_okay=False), help="Write a self-contained HTML report.")
@click.option("--overwrite", is_flag=True, help="Allow -o to be the input file.")
@click.option("--dry-run", is_flag=True, help="Plan and validate, write nothing.")
def prune(model: str, output: str | None, target_flops: float | None, target_params: float | None,
          target_latency: float | None, method: str, strategy: str, round_to: str, hardware: str, no_measure: bool,
          min_speedup: float | None, ignore: tuple[str, ...],
          input_shape: str | None, seed: int, calib: str | None, as_json: bool, report_html: str | None, overwrite: bool,
          dry_run: bool) -> None:
    """Prune MODEL (ONNX) to a FLOPs/params/latency target and write a validated slim model."""
    from graphprune import api

    if output is None and not dry_run:
        fail("missing -o/--output (or pass --dry-run)")
    if target_flops is None and target_params is None and target_latency is None:
        fail("give a target: --target-flops, --target-params or --target-latency")
    if output and os.path.exists(model) and os.path.exists(output) and os.path.samefile(model, output) and not overwrite:
        fail(f"output {output} is the input file; pass --overwrite to replace it")
    _terminate_as_interrupt()
    shapes = run_guarded(parse_shape, input_shape)
    status, say = _progress_printer(not as_json and sys.stderr.isatty())
    try:
        result = run_guarded(
            api.prune, model, target_flops=target_flops, target_params=target_params,
            target_latency=target_latency, method=method, strategy=strategy, round_to=round_to,
            hardware=hardware, measure=not no_measure, min_speedup=min_speedup,
            ignore=ignore, seed=seed, input_shape=shapes, progress=say,
            **({"calib": calib} if calib else {}),
        )
        if output and not dry_run:
            run_guarded(result.save, output)
            result.report["output"] = output
        if report_html:
            from graphprune.report.html import write_html_report

            run_guarded(write_html_report, result, report_html)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=float))
    else:
        from rich.console import Console

        from graphprune.report.summary import render_tables

        render_tables(result.report, Console())
        if output and not dry_run:
            click.echo(f"wrote {output}")
    warn_if_not_faster(result.report)


def warn_if_not_faster(report: dict) -> None:
    """A pruned model that is not measurably faster gets a loud warning on stderr, whatever the output mode."""
    lat = report.get("latency")
    if not lat:
        return
    sp = lat["speedup"]
    if sp < 1.05:
        click.secho(f"WARNING: the pruned model is {'SLOWER than' if sp < 1 else 'not measurably faster than'} the "
                    f"original on {lat['backend']} ({lat['before_ms']:.2f} -> {lat['after_ms']:.2f} ms, {sp:.2f}x, "
                    f"while FLOPs shrank {lat['flops_speedup']:.2f}x). Try --round-to auto or --target-latency; "
                    "--min-speedup makes this an error.", err=True, fg="red", bold=True)


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


@main.command()
@click.option("--hardware", "targets", multiple=True, type=click.Choice(["ort-cpu", "cuda-fp16"]),
              help="Which backend to measure (repeatable; default: ort-cpu, plus cuda-fp16 when a GPU is visible).")
@click.option("--rounds", default=7, show_default=True, help="Timed runs per channel count (median).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write the table (default: the user cache, which --round-to auto then prefers).")
def calibrate(targets: tuple[str, ...], rounds: int, output: str | None) -> None:
    """Measure which channel multiples are fast here (the table behind --round-to auto)."""
    from graphprune.backends import channel_table as ct

    if not targets:
        targets = ("ort-cpu",)
        try:
            import torch

            if torch.cuda.is_available():
                targets += ("cuda-fp16",)
        except ImportError:
            pass
    status, say = _progress_printer(sys.stderr.isatty())
    try:
        entries = {hw: run_guarded(ct.measure, hw, rounds=rounds, progress=say) for hw in targets}
    finally:
        if status is not None:
            status.stop()
    path = run_guarded(ct.write_table, entries, output or ct.user_table_path())
    for hw, e in entries.items():
        gains = ", ".join(f"{m}: {g:.2f}" for m, g in e["gains"].items())
        click.echo(f"{hw}: multiple {e['multiple']} (MACs/ms gain by multiple {gains}) on {e['measured_on']}")
    click.echo(f"wrote {path}")


from graphprune.cli_inspect import inspect  # noqa: E402
main.add_command(inspect)
from graphprune.cli_backend import bench, tune  # noqa: E402
main.add_command(bench); main.add_command(tune)

if __name__ == "__main__":  # pragma: no cover
    main()
