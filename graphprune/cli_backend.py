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


def _same_signature(a: str, b: str) -> None:
    """--compare only makes sense for two versions of one model: same input and output names/types."""
    import onnx

    def signature(path: str) -> tuple:
        try:
            g = onnx.load(path, load_external_data=False).graph
        except Exception:
            raise GraphpruneError(f"not a valid ONNX file: {path}") from None
        inits = {t.name for t in g.initializer}
        io = lambda vs: [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))  # noqa: E731
                         for v in vs if v.name not in inits]
        return io(g.input), io(g.output)

    (ai, ao), (bi, bo) = signature(a), signature(b)
    if ai != bi or ao != bo:
        raise GraphpruneError(f"--compare {b} does not have the same inputs and outputs as {a} "
                              f"(inputs {[x[0] for x in ai]} vs {[x[0] for x in bi]}, "
                              f"outputs {[x[0] for x in ao]} vs {[x[0] for x in bo]}); compare two versions of one model")


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


def _measure(model: str, backend: str, target: str, runs: int, warmup: int, threads: int,
             db: str | None, rpc: Any, mcpu: str = "generic",
             shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    from graphprune.backends.macs import count_macs
    from graphprune.backends.ort_backend import measure_ort, random_inputs

    row: dict[str, Any] = {"model": model, "macs": count_macs(model, input_shape=shapes)}
    if backend == "ort":
        stats = measure_ort(model, runs=runs, warmup=warmup, intra_op_threads=threads,
                            feeds=random_inputs(model, input_shape=shapes))
    else:
        from graphprune.backends import tvm_backend as tb

        tgt = tb.make_target(target, num_cores=threads or None, mcpu=None if mcpu == "generic" else mcpu)
        mod = tb.import_onnx(model)
        ex = tb.compile_tuned(mod, tgt, db) if db else tb.compile_untuned(mod, tgt)
        coverage = tb.kernel_coverage(mod, tgt, db)
        row.update(coverage)
        # "tuned" only when every kernel runs a measured schedule; the others use the default schedule
        row["tuned"] = coverage["kernels_tuned"] == coverage["kernels"] > 0
        if coverage["kernels_default"]:
            console.print(f"{markup(model)}: {coverage['kernels_tuned']} of {coverage['kernels']} kernels have tuning "
                          f"records; {len(coverage['kernels_default'])} run the default schedule")
        stats = tb.measure_tvm(ex, tgt, random_inputs(model, input_shape=shapes), tb.graph_input_names(model), runs,
                               warmup, rpc=rpc)
    row["latency"] = stats.to_dict()
    row["_stats"] = stats
    return row


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--compare", type=click.Path(exists=True, dir_okay=False), help="Pruned model to compare against MODEL.")
@click.option("--backend", type=click.Choice(["ort", "tvm"]), default="ort", show_default=True)
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True, help="TVM target.")
@click.option("--runs", default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", default=5, show_default=True, help="Untimed runs before timing.")
@click.option("--threads", default=1, show_default=True, help="Intra-op threads (ORT) / cores (TVM).")
@click.option("--db", type=click.Path(file_okay=False), help="TVM: compile with this tuning database.")
@click.option("--mcpu", default="native", show_default=True, help="TVM: LLVM CPU ('native', 'generic' or a name).")
@click.option("--rpc-tracker", help="TVM: measure on a remote device, tracker host:port.")
@click.option("--rpc-key", default="graphprune", show_default=True, help="TVM: device key at the tracker.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--input-shape", help="Static input shape for dynamic models, e.g. 1,3,224,224.")
@_one_line_errors
def bench(model: str, compare: str | None, backend: str, target: str, runs: int, warmup: int, threads: int,
          db: str | None, mcpu: str, rpc_tracker: str | None, rpc_key: str, json_path: str | None,
          input_shape: str | None) -> None:
    """Latency (median, p90, spread) of MODEL, and of --compare, with speed-up vs MAC ratio."""
    from graphprune.backends.latency import speedup
    from graphprune.cli_common import parse_shape

    gate = _output_gate(model, (json_path, "--json"))
    if compare:
        gate.protect_input(compare)
        _same_signature(model, compare)
    shapes = parse_shape(input_shape)

    if backend == "ort" and target != "llvm":
        raise GraphpruneError("--target only applies to --backend tvm (onnxruntime runs on CPU here)")
    rpc = None
    if rpc_tracker:
        if backend != "tvm":
            raise GraphpruneError("--rpc-tracker needs --backend tvm")
        from graphprune.backends.tvm_backend import parse_tracker

        rpc = parse_tracker(rpc_tracker, rpc_key)
    rows = [_measure(m, backend, target, runs, warmup, threads, db, rpc, mcpu, shapes) for m in [model, compare] if m]
    table = Table(title=f"latency ({backend}{'/' + target if backend == 'tvm' else ''}, {runs} runs)")
    for col in ("model", "MMACs", "median ms", "p90 ms", "stdev ms", "spread"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        s = r["_stats"]
        table.add_row(markup(Path(r["model"]).name), f"{r['macs'] / 1e6:.1f}", f"{s.median_ms:.3f}", f"{s.p90_ms:.3f}",
                      f"{s.stdev:.3f}", f"{s.spread_pct:.1f}%")
    Console().print(table)
    report: dict[str, Any] = {"backend": backend, "target": target, "runs": runs,
                              "models": [{k: v for k, v in r.items() if k != "_stats"} for r in rows]}
    if len(rows) == 2:
        sp = speedup(rows[0]["_stats"], rows[1]["_stats"])
        ratio = rows[0]["macs"] / rows[1]["macs"] if rows[1]["macs"] else float("nan")
        Console().print(f"speed-up {sp:.2f}x  (MACs ratio {ratio:.2f}x)")
        report.update(speedup=sp, macs_ratio=ratio)
    _write_json(gate, json_path, report)


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@_one_line_errors
def tune(model: str, target: str, trials: int | None, time_budget: str | None, trials_per_task: int | None,
         db_dir: str, output: str | None,
         num_cores: int | None, mcpu: str, rpc_tracker: str | None, rpc_key: str, retune: bool, no_check: bool,
         json_path: str | None) -> None:
    """MetaSchedule-tune MODEL with TVM, reusing the database in --db; optionally export a library."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from graphprune.backends import tvm_backend as tb

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
    mod = tb.import_onnx(model)
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
                         time_budget_s=budget_s, on_start=on_start, on_trials=on_trials)
    report: dict[str, Any] = {"model": model, "target": str(tgt), **result.to_dict(),
                              **tb.kernel_coverage(mod, tgt, db_dir)}
    ex = tb.compile_tuned(mod, tgt, db_dir)
    if not no_check and rpc is None:
        report["max_abs_diff_vs_ort"] = tb.check_against_ort(ex, tgt, model)
    if output:
        gate.write_with(output, lambda tmp: tb.export_library(ex, tmp))
        report["library"] = str(output)
    table = Table(title="tuning")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("kernels", str(len(result.tasks)))
    table.add_row("tuned now / reused from db", f"{len(result.tuned_tasks)} / {len(result.reused_tasks)}")
    table.add_row("new trials", str(result.new_trials))
    table.add_row("kernels with records / default schedule",
                  f"{report['kernels_tuned']} / {len(report['kernels_default'])}")
    if result.stopped:
        table.add_row("stopped", f"{result.stopped} (run again to resume)")
    table.add_row("db records", f"{result.db_records_before} -> {result.db_records_after}")
    table.add_row("time", f"{result.seconds:.1f} s")
    if "max_abs_diff_vs_ort" in report:
        table.add_row("max |tvm - ort|", f"{report['max_abs_diff_vs_ort']:.2e}")
    if output:
        table.add_row("library", markup(output))
    Console().print(table)
    _write_json(gate, json_path, report)
