"""`graphprune bench` and `graphprune tune`: measured latency and TVM tuning from the command line."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphprune.errors import GraphpruneError
from graphprune.escape import markup

console = Console(stderr=True)


def _one_line_errors(fn: Callable) -> Callable:
    """GraphpruneError -> one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GraphpruneError as exc:
            click.echo(f"graphprune: error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:
            from graphprune.escape import plain

            click.echo(f"graphprune: error: {plain(exc.strerror or type(exc).__name__)}", err=True)
            sys.exit(2)

    return wrapper


def _output_gate(model: str, *paths: tuple[str | None, str]) -> Any:
    """Check every output before any work (see graphprune.outputs): never the input, never a device."""
    from graphprune.outputs import OutputGate

    gate = OutputGate([model])
    for path, what in paths:
        if path:
            gate.claim(path, what)
    return gate


def _write_json(gate: Any, path: str | None, report: dict) -> None:
    if path:
        gate.write_text(path, json.dumps(report, indent=2))
        console.print(f"report written to {markup(path)}")


def _same_signature(a: str, b: str, model_a: Any, model_b: Any) -> None:
    """--compare only makes sense for two versions of one model: same inputs (name, type, shape once
    dynamic dims are pinned) and outputs (name, type, rank)."""
    from graphprune.frontends.onnx_frontend import interface_mismatch

    why = interface_mismatch(model_a, model_b)
    if why:
        raise GraphpruneError(f"--compare {b} does not have the same inputs and outputs as {a} ({why}); "
                              "it is not a drop-in replacement: compare two versions of one model")


def _parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h' -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale is not None else raw
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise GraphpruneError(f"--time-budget must look like 90s, 10m or 1h, got {text!r}") from None
    if not value > 0:
        raise GraphpruneError(f"--time-budget must be positive, got {text!r}")
    return value


def _load_pinned(path: str, shapes: dict[str, tuple[int, ...]] | None) -> Any:
    """The model with dynamic input dims pinned (batch -> 1, others from --input-shape)."""
    from graphprune.frontends.onnx_frontend import pin_input_shapes, read_model

    model, _ = read_model(path)
    return pin_input_shapes(model, shapes)


def _runners(models: list[Any], backend: str, target: str, threads: int, db: str | None, rpc: Any,
             feeds: dict, say: Callable[[str], None], mcpu: str = "generic",
             coverage: list[dict] | None = None, verify: bool = True) -> list[Callable[[], float]]:
    """One callable per model that runs one inference and returns its milliseconds.

    For TVM, each model's kernel coverage by the tuning database is appended to `coverage`. With a
    database, `verify` first checks its records in the model on this machine (`tvm_verify`; reused from
    the database folder when checked before) unless the model runs on an RPC device.
    """
    import time

    if backend == "ort":
        from graphprune.backends.ort_backend import make_session

        out = []
        for m in models:
            sess = make_session(m, threads, spin=threads == 1)

            def run(sess: Any = sess) -> float:
                t0 = time.perf_counter()
                sess.run(None, feeds)
                return (time.perf_counter() - t0) * 1e3

            out.append(run)
        return out
    from graphprune.backends import tvm_backend as tb

    tgt = tb.make_target(target, num_cores=threads or None, mcpu=None if mcpu == "generic" else mcpu)
    names = tb.graph_input_names(models[0])
    out = []
    for i, m in enumerate(models):
        say(f"compiling model {i + 1}/{len(models)} with TVM")
        mod = tb.import_onnx(m)
        ex = None
        if db and verify and rpc is None and tgt.kind.name == "llvm":
            check, ex = _verify(tb, mod, tgt, db, feeds, names, say)
            console.print(f"model {i + 1}: {check.summary()}")
        if ex is None:
            ex = tb.compile_tuned(mod, tgt, db) if db else tb.compile_untuned(mod, tgt)
        cov = tb.kernel_coverage(mod, tgt, db)
        # "tuned" only when every kernel runs a measured schedule; the others use the default schedule
        cov["tuned"] = cov["kernels_tuned"] == cov["kernels"] > 0
        if cov["kernels_default"]:
            reverted = f" ({len(cov['kernels_reverted'])} set aside: slower in the model)" \
                if cov["kernels_reverted"] else ""
            console.print(f"model {i + 1}: {cov['kernels_tuned']} of {cov['kernels']} kernels run tuning "
                          f"records; {len(cov['kernels_default'])} run the default schedule{reverted}")
        if coverage is not None:
            coverage.append(cov)
        out.append(tb.single_run_timer(ex, tgt, feeds, names, rpc=rpc))
    return out


def _verify(tb: Any, mod: Any, tgt: Any, db: str, feeds: dict, names: list[str],
            say: Callable[[str], None]) -> tuple[Any, Any]:
    """The in-model check of the database's records (`tvm_verify.verify_tuned`) and the build it made."""
    from graphprune.backends.tvm_verify import verify_tuned

    return verify_tuned(mod, tgt, db, feeds, names, on_step=say)


MIN_ROUNDS = 5  # below this the IQR says nothing about the noise


def interleaved_bench(runners: list[Callable[[], float]], runs: int, warmup: int,
                      on_round: Callable[[int], None] | None = None) -> list[list[float]]:
    """Warm every model up, then `runs` rounds that each time every model once, in turn.

    Interleaving makes machine noise (other processes, clock changes) hit every model alike; timing
    one model completely and then the other turns that noise into a fake speed-up or slow-down.
    """
    for run in runners:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    for r in range(runs):
        for i, run in enumerate(runners):
            samples[i].append(run())
        if on_round:
            on_round(r + 1)
    return samples


def comparison_noise(a: Any, b: Any) -> float:
    """Relative half-width of the medians' noise (IQR / median, the larger of the two), in percent."""
    return max(a.iqr_pct, b.iqr_pct) / 2


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--compare", type=click.Path(exists=True, dir_okay=False), help="Pruned model to compare against MODEL.")
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default="ort", show_default=True)
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True, help="TVM target.")
@click.option("--runs", default=50, show_default=True, help="Timed rounds (each round runs every model once).")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs per model before timing.")
@click.option("--threads", default=1, show_default=True, help="Intra-op threads (ORT) / cores (TVM).")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@click.option("--strict", is_flag=True, help="Exit 4 when the noise makes the comparison meaningless.")
@click.option("--db", type=click.Path(file_okay=False), help="TVM: compile with this tuning database.")
@click.option("--mcpu", default="native", show_default=True, help="TVM: LLVM CPU ('native', 'generic' or a name).")
@click.option("--rpc-tracker", help="TVM: measure on a remote device, tracker host:port.")
@click.option("--rpc-key", default="graphprune", show_default=True, help="TVM: device key at the tracker.")
@click.option("--no-verify", is_flag=True, help="TVM: use the database's best records as they are, without "
              "checking them in the model (by default a record slower than the default schedule is set aside).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@_one_line_errors
def bench(model: str, compare: str | None, backend: str, target: str, runs: int, warmup: int, threads: int,
          input_shape: str | None, strict: bool, db: str | None, mcpu: str, rpc_tracker: str | None,
          rpc_key: str, no_verify: bool, json_path: str | None) -> None:
    """Latency (median, p90, spread) of MODEL, and of --compare in interleaved rounds, with speed-up vs MAC ratio."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from graphprune.backends.latency import LatencyStats, speedup
    from graphprune.backends.macs import count_macs
    from graphprune.backends.ort_backend import random_inputs
    from graphprune.cli_common import parse_shape

    gate = _output_gate(model, (json_path, "--json"))
    if compare:
        gate.protect_input(compare)
    if backend == "ort" and target != "llvm":
        raise GraphpruneError("--target only applies to --backend tvm (onnxruntime runs on CPU here)")
    if runs < 1 or warmup < 0:
        raise GraphpruneError("--runs must be at least 1 and --warmup at least 0")
    rpc = None
    if rpc_tracker:
        if backend != "tvm":
            raise GraphpruneError("--rpc-tracker needs --backend tvm")
        from graphprune.backends.tvm_backend import parse_tracker

        rpc = parse_tracker(rpc_tracker, rpc_key)
    shapes = parse_shape(input_shape)
    paths = [m for m in (model, compare) if m]
    models = [_load_pinned(p, shapes) for p in paths]
    if len(models) == 2:
        _same_signature(model, compare, models[0], models[1])
    feeds = random_inputs(models[0])
    with Progress(TextColumn("[bold]bench[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        bar = progress.add_task("preparing", total=runs)
        coverage: list[dict] = []
        runners = _runners(models, backend, target, threads, db, rpc, feeds,
                           lambda msg: progress.update(bar, description=msg), mcpu=mcpu, coverage=coverage,
                           verify=not no_verify)
        progress.update(bar, description=f"warm-up ({warmup} runs per model)")
        samples = interleaved_bench(runners, runs, warmup,
                                    lambda r: progress.update(bar, completed=r, description="interleaved rounds"))
    stats = [LatencyStats.from_samples(s) for s in samples]
    macs = [count_macs(m) for m in models]
    table = Table(title=f"latency ({backend}{'/' + target if backend == 'tvm' else ''}, {runs} interleaved rounds)")
    for col in ("model", "MMACs", "median ms", "p90 ms", "IQR", "spread"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for p, s, mc in zip(paths, stats, macs):
        table.add_row(markup(Path(p).name), f"{mc / 1e6:.1f}", f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}",
                      f"{s.iqr_pct:.1f}%", f"{s.spread_pct:.1f}%")
    Console().print(table)
    report: dict[str, Any] = {"backend": backend, "target": target, "runs": runs, "warmup": warmup,
                              "interleaved": True, "input_shape": input_shape,
                              "models": [{"model": p, "macs": mc, "latency": s.to_dict(), **cov}
                                         for p, s, mc, cov in zip(paths, stats, macs, coverage or [{}] * len(paths))]}
    noisy = False
    if len(stats) == 2:
        sp = speedup(stats[0], stats[1])
        ratio = macs[0] / macs[1] if macs[1] else float("nan")
        noise = comparison_noise(stats[0], stats[1])
        Console().print(f"speed-up {sp:.2f}x  (MACs ratio {ratio:.2f}x)  noise ±{noise:.1f}%")
        # fewer than MIN_ROUNDS rounds cannot show the noise at all: never call such a comparison meaningful
        noisy = abs(sp - 1) * 100 < noise or noise > 10 or runs < MIN_ROUNDS
        report.update(speedup=sp, macs_ratio=ratio, noise_pct=noise, meaningful=not noisy)
        if runs < MIN_ROUNDS:
            click.secho(f"WARNING: {runs} rounds cannot show the timing noise; {sp:.2f}x is not a reliable "
                        f"speed-up (use --runs {MIN_ROUNDS} or more).", err=True, fg="red", bold=True)
        elif noisy:
            click.secho(f"WARNING: timing noise (±{noise:.1f}%, IQR/2 of the noisier model) is too large for this "
                        f"comparison: {sp:.2f}x is not a reliable speed-up. Close other programs, add --runs, or "
                        "pin the process to idle cores.", err=True, fg="red", bold=True)
    _write_json(gate, json_path, report)
    if noisy and strict:
        sys.exit(4)


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True)
@click.option("--trials", type=int, help="Total MetaSchedule trial budget (default 64, or unlimited with "
              "--time-budget).")
@click.option("--time-budget", "time_budget", help="Stop tuning after this long (e.g. 90s, 10m, 1h); what was "
              "measured is kept and a later run resumes.")
@click.option("--trials-per-task", type=int, help="Cap per kernel (default: budget split evenly).")
@click.option("--db", "db_dir", required=True, type=click.Path(file_okay=False),
              help="Tuning database directory (JSON); reused on later runs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Export the compiled library (.so).")
@click.option("--num-cores", type=int, help="Cores of the device to tune for (default: this machine's).")
@click.option("--mcpu", default="native", show_default=True,
              help="LLVM CPU to generate code for ('native': this machine's; 'generic': baseline x86-64). "
              "Give the device's CPU when tuning over RPC.")
@click.option("--rpc-tracker", help="Measure candidates on a remote device, tracker host:port.")
@click.option("--rpc-key", default="graphprune", show_default=True)
@click.option("--retune", is_flag=True, help="Tune kernels even when the database already has them.")
@click.option("--no-check", is_flag=True, help="Skip the output check against onnxruntime.")
@click.option("--no-verify", is_flag=True, help="Do not check the tuned records in the model (by default each "
              "kernel's record is timed in the model against its default schedule, and set aside if slower).")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224 (dynamic batch -> 1).")
@click.option("--verbose", is_flag=True, help="Show TVM's own log on the terminal (it always goes to DB/logs/).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@_one_line_errors
def tune(model: str, target: str, trials: int | None, time_budget: str | None, trials_per_task: int | None,
         db_dir: str, output: str | None, num_cores: int | None, mcpu: str, rpc_tracker: str | None, rpc_key: str,
         retune: bool, no_check: bool, no_verify: bool, input_shape: str | None, verbose: bool,
         json_path: str | None) -> None:
    """MetaSchedule-tune MODEL with TVM, reusing the database in --db; optionally export a library."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from graphprune.backends import tvm_backend as tb
    from graphprune.cli_common import parse_shape

    gate = _output_gate(model, (output, "-o"), (json_path, "--json"))
    if os.path.exists(db_dir) and not os.path.isdir(db_dir):
        raise GraphpruneError(f"--db {db_dir} exists and is not a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(db_dir))):
        raise GraphpruneError(f"--db {db_dir}: parent folder does not exist")
    budget_s = _parse_duration(time_budget) if time_budget else None
    if trials is None:
        trials = 64 if budget_s is None else 1 << 30
    if trials < 1:
        raise GraphpruneError(f"--trials must be at least 1, got {trials}")
    tgt = tb.make_target(target, num_cores=num_cores, mcpu=None if mcpu == "generic" else mcpu)
    rpc = tb.parse_tracker(rpc_tracker, rpc_key) if rpc_tracker else None
    # dynamic dims are pinned before import: MetaSchedule extracts tasks from static shapes only
    pinned = _load_pinned(model, parse_shape(input_shape))
    mod = tb.import_onnx(pinned)
    with Progress(TextColumn("[bold]tuning[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        bar = progress.add_task("", total=None)

        def on_start(names: list[str], total: int) -> None:
            progress.update(bar, total=max(total, 1) if total < (1 << 29) else None,
                            description=f"{len(names)} kernel(s) to tune")

        def on_trials(name: str, n: int, best_ms: float | None) -> None:
            best = f"  best {best_ms:.3f} ms" if best_ms is not None else ""
            progress.update(bar, advance=n, description=escape(f"{name}{best}"))

        result = tb.tune(mod, tgt, db_dir, trials, trials_per_task=trials_per_task, rpc=rpc, retune=retune,
                         time_budget_s=budget_s, on_start=on_start, on_trials=on_trials, quiet=not verbose)
    ex = check = None
    if not no_verify and rpc is None and tgt.kind.name == "llvm":
        from graphprune.backends.ort_backend import random_inputs

        with console.status("checking the tuned records in the model"):
            check, ex = _verify(tb, mod, tgt, db_dir, random_inputs(pinned), tb.graph_input_names(pinned),
                                lambda _msg: None)
    report: dict[str, Any] = {"model": model, "target": str(tgt), "input_shape": input_shape,
                              "tvm_log_dir": str(Path(db_dir) / "logs"), **result.to_dict(),
                              **tb.kernel_coverage(mod, tgt, db_dir),
                              "verification": check.to_dict() if check else None}
    ex = ex if ex is not None else tb.compile_tuned(mod, tgt, db_dir)
    if not no_check and rpc is None:
        report["max_abs_diff_vs_ort"] = tb.check_against_ort(ex, tgt, pinned)
    if output:
        gate.write_with(output, lambda tmp: tb.export_library(ex, tmp))
        report["library"] = str(output)
    table = Table(title="tuning")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("kernels", str(len(result.tasks)))
    table.add_row("tuned now / reused from db", f"{len(result.tuned_tasks)} / {len(result.reused_tasks)}")
    table.add_row("new trials", str(result.new_trials))
    if result.default_ms:
        names = [n for n in result.default_ms if n in result.best_ms]
        table.add_row(f"default -> best, {len(names)} kernel(s) started now",
                      f"{sum(result.default_ms[n] for n in names):.3f} -> {sum(result.best_ms[n] for n in names):.3f} ms")
    table.add_row("kernels on tuned records / default schedule",
                  f"{report['kernels_tuned']} / {len(report['kernels_default'])}")
    if check is not None:
        table.add_row("checked in the model: kept / reverted to default",
                      f"{len(check.kept) + len(check.same_as_default)} / {len(check.reverted)}"
                      + (" (whole model: tuned was slower)" if check.model_fallback else "")
                      + (" (reused)" if check.reused else ""))
        if check.model_ms:
            table.add_row("model: default / tuned / verified",
                          " / ".join(f"{check.model_ms[k]:.3f}" for k in ("default", "tuned", "verified")
                                     if k in check.model_ms) + " ms")
    elif rpc is not None:
        table.add_row("checked in the model", "no (records measured over RPC)")
    if result.stopped:
        table.add_row("stopped", f"{result.stopped} (run again to resume)")
    table.add_row("db records", f"{result.db_records_before} -> {result.db_records_after}")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("TVM log", str(Path(db_dir) / "logs"))
    if "max_abs_diff_vs_ort" in report:
        table.add_row("max |tvm - ort|", f"{report['max_abs_diff_vs_ort']:.2e}")
    if output:
        table.add_row("library", markup(output))
    Console().print(table)
    _write_json(gate, json_path, report)
