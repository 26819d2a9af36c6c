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
from typing import Any

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
# time on disjoint cores (taskset), then measures everything on one set of cores (benchmarks/tvm_device.sh)

MODELS = ("resnet18", "resnet18_slim")
# untuned builds measured beside the default schedule: name -> environment while compiling. Session 4's device
# run measured GRAPHPRUNE_TVM_PAD=task (pad_in_task); now a second build of the default schedules: the tuned
# slim of that run was slower than its default in kernels whose schedule the tuning had not changed, so this
# shows how far two builds of the same schedules differ
VARIANTS: dict[str, dict[str, str]] = {"default_rebuild": {}}


def stage_prepare(work: Path, size: int, target_flops: float, round_to: int, extra_round_to: int | None,
                  extra_strategy: str | None = None) -> None:
    """Export resnet18 and prune its slim into `work` (both ONNX), with the plan's MACs ratio; with
    `extra_round_to` / `extra_strategy`, a second slim at that channel multiple or allocation strategy
    (measured untuned, for comparison)."""
    import graphprune

    work.mkdir(parents=True, exist_ok=True)
    _export_resnet18(work / "resnet18.onnx", size)
    info: dict = {"size": size, "target_flops": target_flops, "round_to": round_to}
    extras = [("", {"round_to": round_to})]
    if extra_round_to:
        extras.append((f"_r{extra_round_to}", {"round_to": extra_round_to}))
    if extra_strategy:
        extras.append((f"_{extra_strategy}", {"round_to": round_to, "strategy": extra_strategy}))
    for suffix, options in extras:
        result = graphprune.prune(str(work / "resnet18.onnx"), target_flops=target_flops, **options)
        result.save(str(work / f"resnet18_slim{suffix}.onnx"))
        info[f"slim{suffix}_macs_ratio"] = result.plan.achieved
        info[f"slim{suffix}_options"] = options
    (work / "prepare.json").write_text(json.dumps(info))


def stage_tune(work: Path, name: str, budgets: list[float], target, trials_per_task: int, log) -> None:
    """Tune one model into work/db_<name> for the largest of the cumulative `budgets`, snapshotting the
    database when each budget is reached (work/db_<name>@<seconds>, taken after the batch that crosses
    it) so that latency against budget is measured afterwards, quietly.

    Tuning runs in passes whose trials per kernel double, starting at `trials_per_task`: the first pass
    gives every kernel its default schedule (all measured as one batch) and one batch of search, later
    passes deepen the search, heaviest kernels first. Session 3's one deep search per kernel (48 trials,
    a new tuning call per budget) reached only the 6-7 heaviest of ~20 kernels in 150 s; each call also
    pays for new builder/runner worker pools and the task extraction, so budgets are snapshots of one
    run, not separate calls."""
    import shutil

    from graphprune.backends import tvm_backend as tb

    mod = tb.import_onnx(work / f"{name}.onnx")
    db = work / f"db_{name}"
    start = time.perf_counter()
    steps: list[dict] = []
    trials = {"total": 0, "at_last_snapshot": 0}

    def snapshot(budget: float, per_task: int, stopped: str | None = None) -> None:
        snap = work / f"db_{name}@{budget:.0f}"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(db, snap, ignore=shutil.ignore_patterns("logs"))
        state = json.loads((db / tb.STATE_FILE).read_text()) if (db / tb.STATE_FILE).exists() else {}
        steps.append({"budget_s": budget, "elapsed_s": time.perf_counter() - start, "trials_per_task": per_task,
                      "new_trials": trials["total"] - trials["at_last_snapshot"],
                      "kernels_with_default": sum(1 for e in state.values() if "default_ms" in e),
                      "kernels_searched": sum(1 for e in state.values() if int(e.get("measured", 0)) > 1),
                      "stopped": stopped, "db": snap.name})
        trials["at_last_snapshot"] = trials["total"]
        log(f"{name}: budget {budget:.0f} s at {steps[-1]['elapsed_s']:.0f} s: {trials['total']} trials, "
            f"{steps[-1]['kernels_searched']} kernels searched")
        (work / f"tune_{name}.json").write_text(json.dumps(steps, indent=1))

    marks = sorted(budgets)
    per_task = trials_per_task

    def on_trials(kernel: str, n: int, best_ms: float | None) -> None:
        trials["total"] += n
        if n == 1:  # the default schedules, reported one by one before the state is saved: snapshot later
            return
        while len(steps) < len(marks) and time.perf_counter() - start >= marks[len(steps)]:
            snapshot(marks[len(steps)], per_task)

    result = None
    while len(steps) < len(marks):
        left = marks[-1] - (time.perf_counter() - start)
        if left <= 0:
            break
        result = tb.tune(mod, target, db, trials=1 << 30, trials_per_task=per_task, time_budget_s=left,
                         on_trials=on_trials)
        if result.stopped is None and result.new_trials == 0:
            break  # every kernel's search space is exhausted
        if result.stopped is None:
            per_task *= 2
    while len(steps) < len(marks):  # budgets not reached: the database as the run left it
        snapshot(marks[len(steps)], per_task, result.stopped if result else None)


def _ort_rounds(path: Path, feeds: dict, threads: int, runs: int, rounds: int) -> list[float]:
    """onnxruntime medians of `rounds` rounds of `runs` inferences (one session; closed before TVM runs, so
    that its spinning threads do not share the cores with TVM's)."""
    from graphprune.backends.ort_backend import sample_ort

    samples = sample_ort(str(path), feeds, runs * rounds, 5, threads)
    return [float(np.median(samples[r * runs:(r + 1) * runs])) for r in range(rounds)]


def _compile_variant(tb, mod, target, env: dict):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return tb.compile_untuned(mod, target)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _time_builds(tb, row: dict, builds: list, target, feeds: dict, order: list[str], runs: int, rounds: int) -> None:
    """Every build of one model timed in `rounds` interleaved rounds (each the median of `runs` inferences);
    the row keeps each build's per-round medians and their median."""
    timers = []
    for build, ex in builds:
        vm, dev, args = tb._vm_on_device(ex, target, feeds, order, None)
        vm["main"](*args)
        timers.append((build, vm.time_evaluator("main", dev, number=1, repeat=runs, min_repeat_ms=0), args))
    per_round: dict[str, list[float]] = {}
    for _ in range(rounds):
        for build, timer, args in timers:
            per_round.setdefault(build, []).append(float(np.median(timer(*args).results)) * 1e3)
    row["tvm_rounds_ms"] = per_round
    row["tvm_default_schedule_ms"] = float(np.median(per_round["default"]))
    row["default_over_ort"] = row["tvm_default_schedule_ms"] / row["ort_ms"]
    for variant in VARIANTS:
        if variant in per_round:
            row[f"tvm_{variant}_ms"] = float(np.median(per_round[variant]))
    for step in row["tuning"]:
        step["tvm_ms"] = float(np.median(per_round[f"tuned@{step['budget_s']:.0f}"]))
        step["tvm_over_ort"] = step["tvm_ms"] / row["ort_ms"]
        if f"verified@{step['budget_s']:.0f}" in per_round:
            step["tvm_verified_ms"] = row["tvm_verified_ms"] = float(
                np.median(per_round[f"verified@{step['budget_s']:.0f}"]))
            step["tvm_verified_over_ort"] = step["tvm_verified_ms"] / row["ort_ms"]
    row["tvm_best_ms"] = min(float(np.median(v)) for v in per_round.values())


def _verify_last(tb, row: dict, step: dict, work: Path, mod, target, feeds: dict, order: list[str], builds: list,
                 runs: int, log) -> None:
    """The in-model check (`tvm_verify.verify_tuned`) of the last snapshot's records, on the measuring cores
    (the tuners ran concurrently, on two halves of the socket: their measurements had a neighbour, this one
    has none); its build joins the timed builds as verified@<budget>. It works on a copy of the snapshot,
    so the snapshot's own build stays the database's records as they are."""
    import shutil

    from graphprune.backends.tvm_verify import verify_tuned

    budget = f"{step['budget_s']:.0f}"
    db = work / f"{step['db']}_verified"
    shutil.rmtree(db, ignore_errors=True)
    shutil.copytree(work / step["db"], db)
    by_name = {b: ex for r, b, ex in builds if r is row}
    t = time.perf_counter()
    check, ex = verify_tuned(mod, target, db, feeds, order, rounds=5, runs=runs,
                             default_ex=by_name["default"], tuned_ex=by_name[f"tuned@{budget}"])
    row["verification"] = check.to_dict()
    builds.append((row, f"verified@{budget}", ex if ex is not None else tb.compile_tuned(mod, target, db)))
    log(f"{row['model']}: verified@{budget}: {check.summary()} ({time.perf_counter() - t:.0f} s)")


def stage_measure(work: Path, target, threads: int, runs: int, log, out: Path | None = None,
                  rounds: int = 5) -> dict:
    """onnxruntime, TVM's default schedule (and `VARIANTS`) and TVM at every tuning snapshot, all models,
    same thread count. Every TVM build is timed in `rounds` interleaved rounds (each a median of `runs`
    inferences; the report keeps the median over rounds): on the device, one median of 50 runs of the same
    program varied from 1.87 to 2.76 ms between two measurements minutes apart (session 3), so single
    measurements in a row cannot rank builds. Then the time of every kernel of each model's default and
    best-tuned build (`profile_kernels`). The report is rewritten after each part, so a run stopped early
    keeps what it measured."""
    import gc

    from graphprune.backends import tvm_backend as tb
    from graphprune.backends.ort_backend import random_inputs
    from graphprune.errors import GraphpruneError

    report: dict = {"machine": platform.processor() or platform.machine(), "target": str(target),
                    "threads": threads, "rounds": rounds, "runs_per_round": runs,
                    **json.loads((work / "prepare.json").read_text()), "models": []}

    def save() -> None:
        if out:
            out.write_text(json.dumps(report, indent=2))

    names = [n for n in (*MODELS, *sorted(p.stem for p in work.glob("resnet18_slim_*.onnx")))
             if (work / f"{n}.onnx").exists()]
    builds: list[tuple[dict, str, Any]] = []  # (model row, build name, executable)
    for name in names:
        path = work / f"{name}.onnx"
        mod = tb.import_onnx(path)
        feeds = random_inputs(str(path))
        order = tb.graph_input_names(str(path))
        ort = _ort_rounds(path, feeds, threads, runs, rounds)
        gc.collect()
        row: dict = {"model": name, "threads": threads, "ort_ms": float(np.median(ort)), "ort_rounds_ms": ort}
        t = time.perf_counter()
        default = tb.compile_untuned(mod, target)
        row["max_abs_diff_vs_ort"] = tb.check_against_ort(default, target, str(path), rtol=1e-3, atol=1e-3)
        builds.append((row, "default", default))
        for variant, env in VARIANTS.items():
            ex = _compile_variant(tb, mod, target, env)
            try:
                row[f"{variant}_max_abs_diff_vs_ort"] = tb.check_against_ort(ex, target, str(path), rtol=1e-3,
                                                                             atol=1e-3)
                builds.append((row, variant, ex))
            except GraphpruneError as exc:
                row[f"{variant}_check_failed"] = str(exc)
        steps = json.loads((work / f"tune_{name}.json").read_text()) if (work / f"tune_{name}.json").exists() else []
        trials = 0
        for step in steps:
            db = work / step["db"]
            trials += step["new_trials"]
            cover = tb.kernel_coverage(mod, target, db)
            step.update(trials=trials, kernels=cover["kernels"], kernels_tuned=cover["kernels_tuned"])
            # the database's best records as they are (what session 4 measured), before any verification
            builds.append((row, f"tuned@{step['budget_s']:.0f}", tb.compile_tuned(mod, target, db, verified=False)))
        if steps:
            try:  # the numbers are only worth something if the tuned build computes the model
                row["tuned_max_abs_diff_vs_ort"] = tb.check_against_ort(builds[-1][2], target, str(path),
                                                                        rtol=1e-3, atol=1e-3)
            except GraphpruneError as exc:
                row["check_failed"] = str(exc)
            _verify_last(tb, row, steps[-1], work, mod, target, feeds, order, builds, runs, log)
        row["tuning"] = steps
        _time_builds(tb, row, [(b, ex) for r, b, ex in builds if r is row], target, feeds, order, runs, rounds)
        log(f"{name}: onnxruntime {row['ort_ms']:.2f} ms, TVM default {row['tvm_default_schedule_ms']:.2f} ms, "
            + ", ".join(f"{b} {np.median(v):.2f}" for b, v in row["tvm_rounds_ms"].items() if b != "default")
            + f" ({time.perf_counter() - t:.0f} s)")
        report["models"].append(row)
        save()
        # where the time goes, per kernel, on this many threads: the default (and its variants), the last
        # snapshot and its checked build
        for build, ex in [(b, ex) for r, b, ex in builds if r is row]:
            if build in ("default", *VARIANTS) or (steps and build in (f"tuned@{steps[-1]['budget_s']:.0f}",
                                                          f"verified@{steps[-1]['budget_s']:.0f}")):
                row.setdefault("kernel_ms", {})[build] = tb.profile_kernels(ex, target, feeds, order, runs=runs)
        save()
        builds = []  # the executables of this model are not needed any more
    orig = report["models"][0]
    for row in report["models"][1:]:
        last = row["tuning"][-1]["tvm_ms"] if row["tuning"] else row["tvm_default_schedule_ms"]
        olast = orig["tuning"][-1]["tvm_ms"] if orig["tuning"] else orig["tvm_default_schedule_ms"]
        row["tvm_speedup_vs_original"] = olast / last
        row["tvm_default_speedup_vs_original"] = orig["tvm_default_schedule_ms"] / row["tvm_default_schedule_ms"]
        row["tvm_best_speedup_vs_original"] = orig["tvm_best_ms"] / row["tvm_best_ms"]
        if "tvm_verified_ms" in row and "tvm_verified_ms" in orig:
            row["tvm_verified_speedup_vs_original"] = orig["tvm_verified_ms"] / row["tvm_verified_ms"]
        row["ort_speedup_vs_original"] = orig["ort_ms"] / row["ort_ms"]
        verified = row.get("tvm_verified_speedup_vs_original")
        log(f"{row['model']}: slim/original TVM tuned {row['tvm_speedup_vs_original']:.2f}x, "
            + (f"verified {verified:.2f}x, " if verified else "") + "default "
            f"{row['tvm_default_speedup_vs_original']:.2f}x, best build {row['tvm_best_speedup_vs_original']:.2f}x; "
            f"onnxruntime {row['ort_speedup_vs_original']:.2f}x")
    # transfer: which of the slim's kernels the original's records already cover (same structure and shapes)
    if orig["tuning"]:
        slim_mod = tb.import_onnx(work / "resnet18_slim.onnx")
        shared = tb.kernel_coverage(slim_mod, target, work / orig["tuning"][-1]["db"])
        report["slim_kernels"] = shared["kernels"]
        report["slim_kernels_shared_with_original"] = shared["kernels_tuned"]
    save()
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
    ap.add_argument("--extra-strategy", help="--stage prepare: also a slim with this allocation strategy "
                    "(measured untuned)")
    ap.add_argument("--rounds", type=int, default=5, help="--stage measure: interleaved timing rounds")
    ap.add_argument("--workdir", help="folder of the staged run (models, databases, snapshots)")
    ap.add_argument("--model", choices=MODELS, help="--stage tune: which model")
    ap.add_argument("--trials-per-task", type=int, default=16,
                    help="--stage tune: trials a kernel may get in the first budget step (doubling with each step)")
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
            stage_prepare(work, args.size, args.target_flops, args.round_to, args.extra_round_to, args.extra_strategy)
        elif args.stage == "tune":
            budgets = args.budgets if args.model == "resnet18" else args.slim_budgets
            stage_tune(work, args.model, [float(b) for b in budgets.split(",")], target, args.trials_per_task, log)
        else:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            report = stage_measure(work, target, args.threads, args.runs, log, Path(args.out), args.rounds)
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
