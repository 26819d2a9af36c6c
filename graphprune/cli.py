"""Command-line entry point: a thin layer over the public Python API (graphprune.api)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS, NORM_CHANNELS
from graphprune.cli_backend import bench, tune
from graphprune.cli_common import (EXIT_USAGE, _calibration_options, _said_dry_run, _terminate_as_interrupt,
                                   exit_interrupted, fail, image_folder_options, parse_shape, parse_values,
                                   restore_interrupt_handlers, run_guarded)
from graphprune.cli_finetune import finetune
from graphprune.cli_inspect import inspect


class _DefaultToPrune(click.Group):
    """`graphprune model.onnx ...` means `graphprune prune model.onnx ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)

    # An interrupt anywhere, not only inside run_guarded (argument parsing, a command's own lines
    # between its guarded calls), ends like one inside it: one line, exit 130. Click's own handling
    # would print "Aborted!" and exit 1.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            exit_interrupted()

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            exit_interrupted()

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """In-process use (click's CliRunner, an application catching SystemExit): the interrupt
        signals an interrupt exit ignored are given back when it returns."""
        try:
            return super().main(*args, **kwargs)
        finally:
            restore_interrupt_handlers()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The program's entry (the `graphprune` script, `python -m graphprune.cli`): the process ends
        with this call, so signals ignored by an interrupt exit stay ignored until it has."""
        return super().main(*args, **kwargs)


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
    from graphprune.escape import markup

    # progress lines can quote the model's names: escaped like every other printed model string
    return status, (lambda msg: status.update(markup(msg)))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), help="Where to write the pruned ONNX model.")
@click.option("--target-flops", type=float, help="Fraction of MACs (FLOPs) to keep, e.g. 0.4.")
@click.option("--target-params", type=float, help="Fraction of parameters to keep.")
@click.option("--target-latency", type=float, help="Fraction of measured latency to keep.")
@click.option("--method", default=None,
              help="Importance: l1, l2, bn_scale, fpgm, random; act (activation-aware, needs --calib); di, a "
                   "structure search (needs --calib). hfp, ssr, hbfp and taylor train or need gradients: run them "
                   "from Python (docs/methods.md). [default: act with --calib, else l1]")
@click.option("--strategy", type=click.Choice(["speed", "global", "uniform", "sensitivity"]), default="speed",
              show_default=True,
              help="Budget per layer: speed (global ranking, channels that cost more time per MAC on --hardware "
                   "first), global ranking, uniform ratio, or measured sensitivity (needs --calib).")
@click.option("--round-to", default="auto", show_default=True,
              help="Keep channel counts multiples of N; auto: the multiple measured fast on --hardware.")
@click.option("--hardware", type=click.Choice(["ort-cpu", "cuda-fp16"]), default="ort-cpu", show_default=True,
              help="Whose channel table --round-to auto uses.")
@click.option("--norm-channels", type=click.Choice(list(NORM_CHANNELS)), default=DEFAULT_NORM_CHANNELS, show_default=True,
              help="Channels a LayerNorm normalises over (e.g. ConvNeXt's residual stream): keep them (freeze), or "
                   "prune them too, the LayerNorm then taking its statistics over the kept channels (prune; "
                   "docs/methods.md).")
@click.option("--no-measure", is_flag=True, help="Skip timing original vs pruned on onnxruntime.")
@click.option("--min-speedup", type=float, help="Fail (exit 3, nothing written) if the measured speed-up is below X.")
@click.option("--ignore", multiple=True, help="Node or parameter name (glob) whose channels are never pruned.")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--calib", type=click.Path(), help="Unlabeled calibration inputs: .npz (one array per input, samples on "
              "axis 0) or a folder of images (with --calib-size). For --method di: .npz with x, y.")
@click.option("--calib-samples", type=int, help="Use the first N calibration samples (error if fewer exist).")
@image_folder_options("calib")
@click.option("--recover", type=click.Choice(["none", "bias", "lsq"]),
              help="Accuracy recovery from calibration data [default: lsq with --calib]: bias compensation "
                   "(bias), then layer-wise least-squares reconstruction (lsq).")
@click.option("--strict-method", is_flag=True, help="Fail (exit 2) if the method cannot score every prunable group.")
@click.option("--finetune-steps", type=int, default=0, show_default=True,
              help="After pruning, distil the original into the slim model for N steps on the --calib data "
                   "(label-free; see `graphprune finetune` for the full set of options).")
@click.option("--finetune-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for --finetune-steps.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of tables.")
@click.option("--report", "report_html", type=click.Path(), help="Write a self-contained HTML report.")
@click.option("--overwrite", is_flag=True, help="Allow an output to be the input file (or its external data).")
@click.option("--dry-run", is_flag=True, help="Plan and validate, write nothing.")
@click.option("--allow-floor", is_flag=True, help="Accept the floor when the target is below it (else exit 2).")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="Fix an input of the validation run, e.g. sr=16000 (repeatable).")
@click.option("--groups", "max_groups", type=click.IntRange(min=0), default=20, show_default=True,
              help="Rows of the group table (largest MAC share first).")
@click.option("--all", "all_groups", is_flag=True, help="List every group in the table.")
def prune(model: str, output: str | None, target_flops: float | None, target_params: float | None,
          target_latency: float | None, method: str | None, strategy: str, round_to: str, hardware: str,
          norm_channels: str, no_measure: bool, min_speedup: float | None, ignore: tuple[str, ...],
          input_shape: str | None, seed: int, calib: str | None, calib_samples: int | None, calib_size: str | None,
          calib_mean: str | None, calib_std: str | None, calib_bgr: bool, calib_gray: bool, calib_layout: str,
          recover: str | None, as_json: bool, report_html: str | None, overwrite: bool, dry_run: bool,
          allow_floor: bool, input_values: tuple[str, ...], strict_method: bool, finetune_steps: int,
          finetune_device: str, max_groups: int, all_groups: bool) -> None:
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
    if seed < 0:
        fail(f"--seed must be a non-negative integer, got {seed}")
    if finetune_steps < 0:
        fail(f"--finetune-steps must be >= 0, got {finetune_steps}")
    if finetune_steps and not calib:
        fail("--finetune-steps needs --calib (the unlabeled inputs to distil on)")
    from graphprune.outputs import OutputGate

    # SIGTERM/SIGHUP unwind like Ctrl-C from here on, the output gate's folder probes included
    _terminate_as_interrupt()
    # every output is checked before any work: input/external-data files, devices, same file twice, folder
    gate = run_guarded(OutputGate, [model, *([calib] if calib else [])], overwrite=overwrite, dry_run=dry_run)
    for path, what in ((output, "-o"), (report_html, "--report")):
        if path:
            run_guarded(gate.claim, path, what)
    shapes = run_guarded(parse_shape, input_shape)
    values = run_guarded(parse_values, input_values)
    calib_kw = run_guarded(_calibration_options, calib, calib_samples, calib_size, calib_mean, calib_std, calib_bgr,
                           calib_gray, calib_layout, recover)
    status, say = _progress_printer(not as_json and sys.stderr.isatty())
    try:
        result = run_guarded(
            api.prune, model, target_flops=target_flops, target_params=target_params,
            target_latency=target_latency, method=method, strategy=strategy, round_to=round_to,
            hardware=hardware, norm_channels=norm_channels, measure=not no_measure, min_speedup=min_speedup,
            ignore=ignore, seed=seed, input_shape=shapes, progress=say, allow_floor=allow_floor,
            input_values=values or None, strict_method=strict_method, **calib_kw,
            **({"finetune_steps": finetune_steps,
                "finetune_options": {"device": finetune_device, "bar": status is None and sys.stderr.isatty()}}
               if finetune_steps else {}),
        )
        written = []
        if output and not dry_run:
            run_guarded(gate.write_model, result.model, output)
            result.report["output"] = output
            written.append(output)
        if report_html:
            from graphprune.report.html import render_html_report

            run_guarded(gate.write_text, report_html, render_html_report(result))
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
        if "finetune" in result.report:
            from graphprune.cli_finetune import print_summary

            print_summary(result.report["finetune"], None)
    # what happened to the files, last: on stdout with the tables, on stderr when stdout is JSON
    for path in written:
        click.echo(f"wrote {path}", err=as_json)
    warn_if_not_faster(result.report)
    if dry_run:
        _said_dry_run(gate)


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
@click.option("--overwrite", is_flag=True, help="Replace example.onnx / example_slim.onnx already in --out-dir.")
def demo(out_dir: str, target_flops: float, overwrite: bool) -> None:
    """Prune the built-in example CNN end to end and check it against consumer-side masking."""
    import numpy as np

    from graphprune import api
    from graphprune.examples import example_cnn
    from graphprune.outputs import OutputGate
    from graphprune.rewrite.masking import mask_consumers_onnx
    from graphprune.rewrite.validate import random_feed, run_onnx
    from graphprune.frontends.onnx_frontend import load_onnx

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --out-dir {out_dir}: {exc.strerror}")
    src = os.path.join(out_dir, "example.onnx")
    dst = os.path.join(out_dir, "example_slim.onnx")
    gate = OutputGate(overwrite=overwrite)
    for path in (src, dst):
        if os.path.lexists(path) and not overwrite:
            fail(f"{path} already exists; pass --overwrite to replace it or choose another --out-dir")
        run_guarded(gate.claim, path, "demo output")
    run_guarded(gate.write_model, example_cnn(), src)
    result = run_guarded(api.prune, src, target_flops=target_flops)
    run_guarded(gate.write_model, result.model, dst)
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


main.add_command(inspect)
main.add_command(bench)
main.add_command(tune)
main.add_command(finetune)

__all__ = ["main", "fail", "run_guarded", "parse_shape", "EXIT_USAGE"]

if __name__ == "__main__":  # pragma: no cover
    main()
