"""`graphprune finetune`: label-free distillation of a pruned model (thin layer over graphprune.distill)."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import click

from graphprune.cli_common import image_folder_options
from graphprune.errors import GraphpruneError


def _parse_losses(items: tuple[str, ...]) -> dict[str, str]:
    """('logits=mse', ...) -> {'logits': 'mse'}."""
    out = {}
    for item in items:
        name, sep, kind = item.rpartition("=")
        if not sep or not name or kind not in ("kl", "mse"):
            raise GraphpruneError(f"bad --loss {item!r}: expected OUTPUT=kl or OUTPUT=mse")
        out[name] = kind
    return out


def _relaunch(nproc: int) -> None:
    """Run this same command under torchrun with `nproc` processes; rank 0 writes the output."""
    from graphprune.cli_common import EXIT_INTERRUPTED, exit_interrupted, fail

    args, skip = [], False
    for a in sys.argv[1:]:  # the workers see WORLD_SIZE; --nproc would also confuse torchrun's own parser
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc"
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "graphprune.cli", *args]
    try:
        rc = subprocess.call(cmd)
    except KeyboardInterrupt:
        exit_interrupted()
    if rc == EXIT_INTERRUPTED:
        sys.exit(EXIT_INTERRUPTED)
    if rc != 0:
        fail(f"distributed fine-tuning failed in a worker (torchrun exit {rc}); no output written")
    sys.exit(0)


@click.command()
@click.argument("original", type=click.Path(dir_okay=False))
@click.argument("slim", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Unlabeled inputs: .npz (one array per input, samples on axis 0) or an image folder (with --data-size).")
@click.option("-o", "--output", type=click.Path(), help="Where to write the fine-tuned ONNX model.")
@click.option("--data-samples", type=int, help="Use the first N samples (error if fewer exist).")
@image_folder_options("data")
@click.option("--steps", type=int, default=500, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Samples per step (over all processes).")
@click.option("--lr", type=float, default=5e-4, show_default=True, help="Peak learning rate (cosine decay).")
@click.option("--warmup", type=float, default=0.05, show_default=True,
              help="Fraction of the steps with a linear learning-rate ramp.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Distillation temperature for KL.")
@click.option("--loss", "losses", multiple=True, metavar="OUTPUT=kl|mse",
              help="Override the loss of one output (default: KL for logits/probabilities, MSE otherwise).")
@click.option("--feature-weight", type=float, default=0.0, show_default=True,
              help="Weight of feature matching at the layers whose inputs were pruned (0 = off).")
@click.option("--eval-every", type=int, default=50, show_default=True, help="Steps between held-out evaluations.")
@click.option("--patience", type=int, default=5, show_default=True,
              help="Stop after this many evaluations without better held-out agreement (0 = never).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--no-amp", is_flag=True, help="CUDA: train in fp32 instead of bf16 autocast.")
@click.option("--no-channels-last", is_flag=True, help="CUDA: keep NCHW memory layout.")
@click.option("--train-bn", is_flag=True, help="Re-estimate BatchNorm statistics while training.")
@click.option("--augment", type=click.Choice(["none", "shift"]), default="none", show_default=True,
              help="Image inputs: random shifts by up to 2 pixels (teacher and student see the same batch).")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Processes (torchrun + DistributedDataParallel); one GPU each with --device cuda.")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,48,320.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of a table.")
@click.option("--overwrite", is_flag=True, help="Allow the output to replace an input file.")
@click.option("--dry-run", is_flag=True, help="Check everything, train, write nothing.")
@click.option("-v", "--verbose", is_flag=True, help="Print each stage on stderr (also when not a terminal).")
def finetune(original: str, slim: str, data: str, output: str | None, data_samples: int | None,
             data_size: str | None, data_mean: str | None, data_std: str | None, data_bgr: bool, data_gray: bool,
             data_layout: str, steps: int, batch_size: int, lr: float, warmup: float, optimizer: str, weight_decay: float,
             temperature: float, losses: tuple[str, ...], feature_weight: float, eval_every: int, patience: int,
             device: str, no_amp: bool, no_channels_last: bool, train_bn: bool, augment: str, nproc: int,
             input_shape: str | None, seed: int, as_json: bool, overwrite: bool, dry_run: bool,
             verbose: bool) -> None:
    """Distil ORIGINAL (teacher) into its pruned SLIM model on unlabeled --data; write the tuned model.

    \b
    graphprune finetune model.onnx slim.onnx --data lines.npz -o tuned.onnx
    graphprune finetune model.onnx slim.onnx --data imgs/ --data-size 224,224 --device cuda --nproc 2 -o tuned.onnx
    """
    # imported here: `python -m graphprune.cli` (how torchrun starts the workers) runs cli.py as __main__
    from graphprune import distill
    from graphprune.cli_common import (_calibration_options, _said_dry_run, _terminate_as_interrupt, fail,
                                       parse_shape, run_guarded)
    from graphprune.outputs import OutputGate

    rank, size, _ = distill.world()
    if output is None and not dry_run:
        fail("missing -o/--output (or pass --dry-run)")
    if seed < 0:
        fail(f"--seed must be a non-negative integer, got {seed}")
    if nproc < 1:
        fail(f"--nproc must be >= 1, got {nproc}")
    writer = rank == 0
    _terminate_as_interrupt()  # before the gate's folder probe: a signal during it must unwind too
    gate = run_guarded(OutputGate, [original, slim, data], overwrite=overwrite, dry_run=dry_run or not writer)
    if output:
        run_guarded(gate.claim, output, "-o")
    shapes = run_guarded(parse_shape, input_shape)
    kw = run_guarded(_calibration_options, data, data_samples, data_size, data_mean, data_std, data_bgr,
                     data_gray, data_layout, None, "--data")
    opts: dict[str, Any] = dict(
        steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, optimizer=optimizer, weight_decay=weight_decay,
        temperature=temperature, loss=run_guarded(_parse_losses, losses), feature_weight=feature_weight,
        eval_every=eval_every, patience=patience, device=device, amp=False if no_amp else None,
        channels_last=False if no_channels_last else None, train_bn=train_bn, augment=None if augment == "none" else augment, seed=seed,
        bar=writer and not as_json and sys.stderr.isatty())
    run_guarded(distill.FinetuneOptions, **opts)  # bad option values fail before any work
    if nproc > 1 and size == 1:
        # the data is checked here first, so bad input is one line from this process, not one per worker
        run_guarded(distill.check_data, original, kw["calib"], kw.get("calib_samples"), kw.get("calib_preprocess"),
                    shapes)
        _relaunch(nproc)
    say = (lambda msg: click.echo(f"graphprune: {msg}", err=True)) if verbose and writer else None
    result = run_guarded(distill.finetune, original, slim, kw["calib"], samples=kw.get("calib_samples"),
                         preprocess=kw.get("calib_preprocess"), input_shape=shapes, progress=say, **opts)
    if not writer:
        return
    if output and not dry_run:
        run_guarded(gate.write_model, result.model, output)
        result.report["output"] = output
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=float))
    else:
        print_summary(result.report, output if output and not dry_run else None)
    if dry_run:
        _said_dry_run(gate)


def print_summary(rep: dict[str, Any], output: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distillation (held-out agreement with the original)")
    table.add_column("output")
    table.add_column("loss")
    for col in ("top-1 before", "top-1 after", "cosine before", "cosine after"):
        table.add_column(col, justify="right")
    for e, b, a in zip(rep["teacher_student"], rep["agreement_before"]["outputs"], rep["agreement_after"]["outputs"]):
        top = [f"{x['top1_agreement']:.4f}" if "top1_agreement" in x else "-" for x in (b, a)]
        table.add_row(e["output"], e["loss"], *top, f"{b['cosine']:.4f}", f"{a['cosine']:.4f}")
    console = Console()
    console.print(table)
    stop = f", stopped early (best at step {rep['best_step']})" if rep["stopped_early"] else ""
    click.echo(f"{rep['steps']} steps on {rep['samples']['train']} samples ({rep['samples']['heldout']} held out), "
               f"{rep['processes']} process(es) on {rep['device']}, {rep['train_s']:.1f} s{stop}")
    if output:
        click.echo(f"wrote {output}")
