"""TVM MetaSchedule tuning against onnxruntime, for resnet18 and its 40%-FLOPs slim (issue 17).

For each model: onnxruntime latency, TVM with TVM's unscheduled fallback, TVM with graphprune's
default schedule (no measurement), then TVM after cumulative tuning budgets (a table of latency
against budget). The slim model is tuned into the original's database, so kernels whose shapes did
not change are reused; the report says how many. Same thread count for both runtimes.

    python benchmarks/tvm_tuning.py --budgets 60,120,240 --slim-budgets 60,150 --threads 16 \
        --out benchmarks/results/tvm_tuning_16c.json

Meant for a many-core machine (the GPU machine's CPU); on 2 cores a useful budget takes hours.
Results: benchmarks/results/tvm_tuning_*.json, table in docs/backends.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _export_resnet18(path: Path, size: int) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])


def _ort_ms(path: Path, feeds: dict, threads: int, runs: int) -> float:
    from graphprune.backends.ort_backend import measure_ort

    return measure_ort(str(path), runs=runs, warmup=5, intra_op_threads=threads).median_ms


def _tvm_ms(executable, target, feeds, names, runs: int) -> float:
    from graphprune.backends import tvm_backend as tb

    return tb.measure_tvm(executable, target, feeds, names, runs=runs, warmup=3).median_ms


def run_model(name: str, path: Path, db: Path, budgets: list[float], target, threads: int, runs: int,
              log, skip_unscheduled: bool = False) -> dict:
    from graphprune.backends import tvm_backend as tb
    from graphprune.backends.ort_backend import random_inputs

    mod = tb.import_onnx(path)
    feeds = random_inputs(str(path))
    names = tb.graph_input_names(str(path))
    row: dict = {"model": name, "threads": threads, "ort_ms": _ort_ms(path, feeds, threads, runs)}
    log(f"{name}: onnxruntime {row['ort_ms']:.2f} ms")
    t = time.perf_counter()
    if not skip_unscheduled:
        row["tvm_unscheduled_ms"] = _tvm_ms(tb.compile_untuned(mod, target, schedule="none"), target, feeds, names,
                                            max(3, runs // 10))
    row["tvm_default_schedule_ms"] = _tvm_ms(tb.compile_untuned(mod, target), target, feeds, names, runs)
    log(f"{name}: unscheduled {row.get('tvm_unscheduled_ms', float('nan')):.1f} ms, "
        f"default {row['tvm_default_schedule_ms']:.2f} ms "
        f"({time.perf_counter() - t:.0f} s)")
    row["coverage_before"] = tb.kernel_coverage(mod, target, db)
    spent, steps = 0.0, []
    for budget in budgets:
        result = tb.tune(mod, target, db, trials=1 << 30, trials_per_task=2000, time_budget_s=budget - spent)
        spent = budget
        ex = tb.compile_tuned(mod, target, db)
        cover = tb.kernel_coverage(mod, target, db)
        step = {"budget_s": budget, "tune_s": result.seconds, "new_trials": result.new_trials,
                "reused_kernels": len(result.reused_tasks), "kernels": cover["kernels"],
                "kernels_tuned": cover["kernels_tuned"], "tvm_ms": _tvm_ms(ex, target, feeds, names, runs)}
        step["tvm_over_ort"] = step["tvm_ms"] / row["ort_ms"]
        steps.append(step)
        log(f"{name}: budget {budget:.0f} s -> {step['tvm_ms']:.2f} ms ({step['tvm_over_ort']:.2f}x ORT), "
            f"{step['kernels_tuned']}/{step['kernels']} kernels, {step['new_trials']} trials")
    row["tuning"] = steps
    row["max_abs_diff_vs_ort"] = tb.check_against_ort(tb.compile_tuned(mod, target, db), target, str(path),
                                                      rtol=1e-3, atol=1e-3)
    return row


# ---- staged mode (--stage prepare|tune|measure): the device run tunes the original and the slim at the same
# time on disjoint cores (taskset), then measures everything one model at a time (benchmarks/tvm_device.sh)

MODELS = ("resnet18", "resnet18_slim")


def stage_prepare(work: Path, size: int, target_flops: float, round_to: int, extra_round_to: int | None) -> None:
    """Export resnet18 and prune its slim into `work` (both ONNX), with the plan's MACs ratio; with
    `extra_round_to`, a second slim at that channel multiple (measured untuned only, for comparison)."""
    import graphprune

    work.mkdir(parents=True, exist_ok=True)
    _export_resnet18(work / "resnet18.onnx", size)
    info: dict = {"size": size, "target_flops": target_flops, "round_to": round_to}
    for suffix, multiple in (("", round_to), (f"_r{extra_round_to}", extra_round_to)):
        if multiple is None:
            continue
        result = graphprune.prune(str(work / "resnet18.onnx"), target_flops=target_flops, round_to=multiple)
        result.save(str(work / f"resnet18_slim{suffix}.onnx"))
        info[f"slim{suffix}_macs_ratio"] = result.plan.achieved
    (work / "prepare.json").write_text(json.dumps(info))


def stage_tune(work: Path, name: str, budgets: list[float], target, trials_per_task: int, log) -> None:
    """Tune one model into work/db_<name> for cumulative time budgets, snapshotting the database after
    each (work/db_<name>@<seconds>) so that latency against budget is measured afterwards, quietly."""
    import shutil

    from graphprune.backends import tvm_backend as tb

    mod = tb.import_onnx(work / f"{name}.onnx")
    db = work / f"db_{name}"
    spent, steps = 0.0, []
    for budget in budgets:
        result = tb.tune(mod, target, db, trials=1 << 30, trials_per_task=trials_per_task,
                         time_budget_s=budget - spent)
        spent = budget
        snap = work / f"db_{name}@{budget:.0f}"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(db, snap, ignore=shutil.ignore_patterns("logs"))
        names = [n for n in result.default_ms if n in result.best_ms]
        steps.append({"budget_s": budget, "tune_s": result.seconds, "new_trials": result.new_trials,
                      "kernels_started": len(names), "default_ms_sum": sum(result.default_ms[n] for n in names),
                      "best_ms_sum": sum(result.best_ms[n] for n in names), "stopped": result.stopped,
                      "db": snap.name})
        log(f"{name}: budget {budget:.0f} s: {result.new_trials} trials in {result.seconds:.0f} s")
        (work / f"tune_{name}.json").write_text(json.dumps(steps, indent=1))


def stage_measure(work: Path, target, threads: int, runs: int, log, out: Path | None = None) -> dict:
    """ORT, TVM default schedule and TVM at every tuning snapshot, one model at a time, same thread count.
    The report is rewritten to `out` after every model, so a run stopped early keeps what it measured."""
    from graphprune.backends import tvm_backend as tb
    from graphprune.backends.ort_backend import random_inputs
    from graphprune.errors import GraphpruneError

    report: dict = {"machine": platform.processor() or platform.machine(), "target": str(target),
                    "threads": threads, **json.loads((work / "prepare.json").read_text()), "models": []}
    extras = sorted(p.stem for p in work.glob("resnet18_slim_r*.onnx"))
    for name in [*MODELS, *extras]:
        path = work / f"{name}.onnx"
        mod = tb.import_onnx(path)
        feeds = random_inputs(str(path))
        names = tb.graph_input_names(str(path))
        row: dict = {"model": name, "threads": threads, "ort_ms": _ort_ms(path, feeds, threads, runs)}
        row["tvm_default_schedule_ms"] = _tvm_ms(tb.compile_untuned(mod, target), target, feeds, names, runs)
        row["default_over_ort"] = row["tvm_default_schedule_ms"] / row["ort_ms"]
        if name == "resnet18":  # what the channels-last layout buys, untuned
            os.environ["GRAPHPRUNE_TVM_LAYOUT"] = "nchw"
            try:
                row["tvm_default_schedule_nchw_ms"] = _tvm_ms(tb.compile_untuned(mod, target), target, feeds, names,
                                                              runs)
            finally:
                del os.environ["GRAPHPRUNE_TVM_LAYOUT"]
        log(f"{name}: onnxruntime {row['ort_ms']:.2f} ms, TVM default {row['tvm_default_schedule_ms']:.2f} ms"
            + (f" (NCHW {row['tvm_default_schedule_nchw_ms']:.2f} ms)" if "tvm_default_schedule_nchw_ms" in row else ""))
        if name in extras:
            report["models"].append({**row, "tuning": []})
            if out:
                out.write_text(json.dumps(report, indent=2))
            continue
        steps = json.loads((work / f"tune_{name}.json").read_text()) if (work / f"tune_{name}.json").exists() else []
        trials, ex = 0, None
        for step in steps:
            db = work / step["db"]
            trials += step["new_trials"]
            cover = tb.kernel_coverage(mod, target, db)
            ex = tb.compile_tuned(mod, target, db)
            step.update(trials=trials, kernels=cover["kernels"], kernels_tuned=cover["kernels_tuned"],
                        tvm_ms=_tvm_ms(ex, target, feeds, names, runs))
            step["tvm_over_ort"] = step["tvm_ms"] / row["ort_ms"]
            log(f"{name}: after {step['budget_s']:.0f} s ({trials} trials) {step['tvm_ms']:.2f} ms "
                f"({step['tvm_over_ort']:.2f}x onnxruntime)")
        row["tuning"] = steps
        # the numbers are only worth something if the fastest build computes the model
        try:
            row["max_abs_diff_vs_ort"] = tb.check_against_ort(ex or tb.compile_untuned(mod, target), target,
                                                              str(path), rtol=1e-3, atol=1e-3)
        except GraphpruneError as exc:
            row["check_failed"] = str(exc)
            log(f"{name}: {exc}")
        report["models"].append(row)
        if out:
            out.write_text(json.dumps(report, indent=2))
    orig, thin = report["models"][:2]
    # transfer: which of the slim's kernels the original's records already cover (same structure and shapes)
    if orig["tuning"]:
        slim_mod = tb.import_onnx(work / "resnet18_slim.onnx")
        shared = tb.kernel_coverage(slim_mod, target, work / orig["tuning"][-1]["db"])
        report["slim_kernels"] = shared["kernels"]
        report["slim_kernels_shared_with_original"] = shared["kernels_tuned"]
    last = lambda row: row["tuning"][-1]["tvm_ms"] if row["tuning"] else row["tvm_default_schedule_ms"]  # noqa: E731
    report["tvm_speedup_slim_vs_original"] = last(orig) / last(thin)
    report["tvm_default_speedup_slim_vs_original"] = orig["tvm_default_schedule_ms"] / thin["tvm_default_schedule_ms"]
    report["ort_speedup_slim_vs_original"] = orig["ort_ms"] / thin["ort_ms"]
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="60,120,240", help="cumulative tuning seconds for the original")
    ap.add_argument("--slim-budgets", default="60,150", help="cumulative tuning seconds for the slim model")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--target-flops", type=float, default=0.4)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--mcpu", default="native")
    ap.add_argument("--out", default="benchmarks/results/tvm_tuning.json")
    ap.add_argument("--db", help="keep the tuning database in this folder (a later run resumes from it); "
                    "default: a temporary folder")
    ap.add_argument("--skip-unscheduled", action="store_true",
                    help="do not time TVM's unscheduled fallback (minutes per model on big inputs)")
    ap.add_argument("--stage", choices=["all", "prepare", "tune", "measure"], default="all",
                    help="all: everything in this process (default); prepare/tune/measure: one step of the "
                    "device run in --workdir (benchmarks/tvm_device.sh)")
    ap.add_argument("--extra-round-to", type=int, help="--stage prepare: also a slim at this channel multiple "
                    "(measured untuned)")
    ap.add_argument("--workdir", help="folder of the staged run (models, databases, snapshots)")
    ap.add_argument("--model", choices=MODELS, help="--stage tune: which model")
    ap.add_argument("--trials-per-task", type=int, default=48,
                    help="--stage tune: trials a kernel may get (sizes the evolutionary search)")
    args = ap.parse_args(argv)

    import graphprune
    from graphprune.backends import tvm_backend as tb

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True)

    target = tb.make_target("llvm", num_cores=args.threads, mcpu=args.mcpu)
    if args.stage != "all":
        if not args.workdir or (args.stage == "tune" and not args.model):
            ap.error("--stage needs --workdir (and --model for tune)")
        work = Path(args.workdir)
        if args.stage == "prepare":
            stage_prepare(work, args.size, args.target_flops, args.round_to, args.extra_round_to)
        elif args.stage == "tune":
            budgets = args.budgets if args.model == "resnet18" else args.slim_budgets
            stage_tune(work, args.model, [float(b) for b in budgets.split(",")], target, args.trials_per_task, log)
        else:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            report = stage_measure(work, target, args.threads, args.runs, log, Path(args.out))
            Path(args.out).write_text(json.dumps(report, indent=2))
        return 0
    report: dict = {"machine": platform.processor() or platform.machine(), "target": str(target),
                    "threads": args.threads, "target_flops": args.target_flops, "round_to": args.round_to,
                    "input": [1, 3, args.size, args.size], "models": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        original = Path(tmp) / "resnet18.onnx"
        slim = Path(tmp) / "resnet18_slim.onnx"
        _export_resnet18(original, args.size)
        result = graphprune.prune(str(original), target_flops=args.target_flops, round_to=args.round_to)
        result.save(str(slim))
        report["slim_macs_ratio"] = result.plan.achieved
        db = Path(args.db) if args.db else Path(tmp) / "db"
        db.mkdir(parents=True, exist_ok=True)
        report["db_records_at_start"] = len(tb.open_database(db))
        for name, path, budgets in (("resnet18", original, args.budgets), ("resnet18_slim", slim, args.slim_budgets)):
            report["models"].append(run_model(name, path, db, [float(b) for b in budgets.split(",")], target,
                                              args.threads, args.runs, log, args.skip_unscheduled))
            out.write_text(json.dumps(report, indent=2))
    orig, thin = report["models"]
    shared = thin["coverage_before"]
    report["slim_kernels_shared_with_original"] = shared["kernels_tuned"]
    report["slim_kernels"] = shared["kernels"]
    report["tvm_speedup_slim_vs_original"] = orig["tuning"][-1]["tvm_ms"] / thin["tuning"][-1]["tvm_ms"]
    report["ort_speedup_slim_vs_original"] = orig["ort_ms"] / thin["ort_ms"]
    report["tvm_default_speedup_slim_vs_original"] = orig["tvm_default_schedule_ms"] / thin["tvm_default_schedule_ms"]
    for row in report["models"]:
        row["default_over_ort"] = row["tvm_default_schedule_ms"] / row["ort_ms"]
    out.write_text(json.dumps(report, indent=2))
    log(f"slim: {shared['kernels_tuned']}/{shared['kernels']} kernels reused from the original's records; "
        f"TVM speed-up {report['tvm_speedup_slim_vs_original']:.2f}x, ORT {report['ort_speedup_slim_vs_original']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
