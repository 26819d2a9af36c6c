"""Where TVM's default schedule loses on many cores (issue 17): per kernel of resnet18 and its 40% slim,
the parallel tasks of the schedule built for C cores, the work per task, the kernel's time on one
thread, and a predicted C-core time.

A parallel loop of T iterations on C threads runs ceil(T / C) rounds (TVM splits iterations evenly and
statically), so a kernel taking t1 on one thread takes about t1 * ceil(T / C) / T on C threads, plus a
fork-join per parallel loop. Kernels whose T is small or just above a multiple of C waste cores; that
is what makes a slim model, whose layers are narrower, scale worse than the original. The one-thread
times run the C-core schedule on one thread (thread CPU time, min over rounds: robust on a shared
machine); `--profile-threads C` instead measures the real C-thread wall time of every kernel (on the
device), next to the prediction.

    python benchmarks/tvm_parallel.py --cores 16 --out benchmarks/results/tvm_parallel_16c.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

FORK_JOIN_MS = 0.005  # assumed cost of one parallel loop's fork-join on a many-core CPU (for the prediction)


def predict(rows: list[dict], cores: int, fork_join_ms: float = FORK_JOIN_MS) -> float:
    """Predicted C-core time (ms) from each kernel's one-thread time and parallel loops: the last parallel
    loop is the kernel's main one (a convolution's padding loop comes first)."""
    total = 0.0
    for row in rows:
        t1 = row.get("t1_ms")
        if t1 is None:
            continue
        extents = row["parallel"]
        if not extents:
            total += t1
            continue
        tasks = extents[-1]
        total += t1 * math.ceil(tasks / cores) / tasks + fork_join_ms * len(extents) * row["calls"]
    return total


def one_thread_ms(executable, target, feeds: dict, names: list[str], rounds: int) -> dict[str, float]:
    """Thread CPU time of every kernel on one thread (min over rounds), summed over its calls."""
    from graphprune.backends import tvm_backend as tb

    return tb.profile_kernels(executable, target, feeds, names, runs=rounds, warmup=1, clock="thread")


def ort_one_thread_ms(path: Path, feeds: dict, rounds: int) -> float:
    """onnxruntime with one intra-op thread: thread CPU time of one inference, min over rounds of 3."""
    from graphprune.backends.ort_backend import make_session

    sess = make_session(str(path), 1)
    sess.run(None, feeds)
    best = float("inf")
    for _ in range(rounds * 3):
        t = time.thread_time()
        sess.run(None, feeds)
        best = min(best, time.thread_time() - t)
    return best * 1e3


def analyse(name: str, path: Path, cores: int, rounds: int, profile_threads: int | None, mcpu: str) -> dict:
    from graphprune.backends import tvm_backend as tb
    from graphprune.backends.ort_backend import random_inputs

    target = tb.make_target("llvm", num_cores=cores, mcpu=mcpu)
    mod = tb.import_onnx(path)
    feeds = random_inputs(str(path))
    names = tb.graph_input_names(str(path))
    rows = tb.kernel_parallelism(mod, target)
    ex = tb.compile_untuned(mod, target)
    tb.check_against_ort(ex, target, str(path), rtol=1e-3, atol=1e-3)
    if profile_threads:
        measured = tb.profile_kernels(ex, target, feeds, names, runs=rounds)
    else:
        measured = {}
    t1 = one_thread_ms(ex, target, feeds, names, rounds) if not profile_threads else {}
    extra: dict = {}
    if not profile_threads:
        # the pad-in-task variant (one fork-join per conv) and onnxruntime, on one thread
        saved = os.environ.get("GRAPHPRUNE_TVM_PAD")
        os.environ["GRAPHPRUNE_TVM_PAD"] = "task"
        try:
            padded = tb.compile_untuned(mod, target)
        finally:
            os.environ.pop("GRAPHPRUNE_TVM_PAD") if saved is None else os.environ.__setitem__("GRAPHPRUNE_TVM_PAD", saved)
        tb.check_against_ort(padded, target, str(path), rtol=1e-3, atol=1e-3)
        extra["t1_pad_in_task_ms"] = sum(one_thread_ms(padded, target, feeds, names, rounds).values())
        extra["ort_t1_ms"] = ort_one_thread_ms(path, feeds, rounds)
    for row in rows:
        row["t1_ms"] = t1.get(row["kernel"])
        if row["parallel"]:
            tasks = row["parallel"][-1]
            row["tasks"] = tasks
            row["flops_per_task"] = row["flops"] / row["calls"] / tasks if row["calls"] else 0.0
            row["core_use"] = tasks / (cores * math.ceil(tasks / cores))
        if row["kernel"] in measured:
            row["measured_ms"] = measured[row["kernel"]]
    report = {"model": name, "kernels": rows, **extra,
              "fork_joins": sum(len(r["parallel"]) * r["calls"] for r in rows)}
    if t1:
        report["t1_ms"] = sum(v for v in t1.values())
        report["predicted_ms"] = predict(rows, cores)
        report["predicted_no_fork_join_ms"] = predict(rows, cores, 0.0)
    if measured:
        report["measured_kernels_ms"] = sum(measured.values())
    return report


def print_report(report: dict, cores: int) -> None:
    print(f"\n{report['model']}: {len(report['kernels'])} kernels, {report['fork_joins']} fork-joins per inference")
    print(f"  {'kernel':40s} {'calls':>5s} {'MFLOP':>7s} {'tasks':>6s} {'kFLOP/task':>10s} {'use':>5s} "
          f"{'1t ms':>7s} {'pred ms':>7s} {'meas ms':>7s}")
    for r in sorted(report["kernels"], key=lambda r: -(r.get("t1_ms") or r.get("measured_ms") or 0)):
        pred = predict([r], cores) if r.get("t1_ms") is not None else None
        print(f"  {r['kernel'][:40]:40s} {r['calls']:5d} {r['flops'] / 1e6:7.1f} {r.get('tasks', 1):6d} "
              f"{r.get('flops_per_task', r['flops']) / 1e3:10.1f} {r.get('core_use', 1 / cores):5.2f} "
              + (f"{r['t1_ms']:7.3f} {pred:7.3f}" if pred is not None else f"{'':7s} {'':7s}")
              + (f" {r['measured_ms']:7.3f}" if "measured_ms" in r else ""))
    if "predicted_ms" in report:
        print(f"  one thread {report['t1_ms']:.2f} ms -> predicted {cores} cores {report['predicted_ms']:.3f} ms "
              f"({report['predicted_no_fork_join_ms']:.3f} ms without fork-join costs)")


def markdown(report: dict) -> str:
    """The docs table: per model, one-thread time, predicted C-core time and the kernels that leave cores idle."""
    from mdtable import md_table

    cores = report["cores"]
    base = report["models"][0]
    rows = []
    for m in report["models"]:
        idle = sorted((r for r in m["kernels"] if r.get("core_use", 1.0) < 0.95 and r.get("t1_ms")),
                      key=lambda r: -r["t1_ms"])
        rows.append([m["model"], f"{m['ort_t1_ms']:.2f} ms", str(len(m["kernels"])), str(m["fork_joins"]),
                     f"{m['t1_ms']:.2f} ms", f"{m['t1_pad_in_task_ms']:.2f} ms",
                     f"{base['t1_ms'] / m['t1_ms']:.2f}x", f"{m['predicted_ms']:.3f} ms",
                     f"{m['predicted_no_fork_join_ms']:.3f} ms", f"{base['predicted_ms'] / m['predicted_ms']:.2f}x",
                     ", ".join(f"{r['tasks']} tasks ({r['core_use']:.2f}, {r['t1_ms']:.2f} ms)" for r in idle[:3])
                     or "none",
                     "-" if m is base else f"{m['kernels_shared_with_original']} ({m['shared_t1_ms']:.2f} ms)"])
    return md_table(["model", "onnxruntime, 1 thread", "kernels", "fork-joins", "TVM, 1 thread",
                     "TVM pad in task, 1 thread", "TVM speed-up (1 thread)",
                     f"predicted {cores} cores", "without fork-joins", f"speed-up ({cores} cores, predicted)",
                     "kernels using < 95% of the cores (tasks, core use, 1-thread time)",
                     "kernels shared with the original (their 1-thread time)"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=16, help="cores the schedule is built for")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--mcpu", default="native")
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--strategies", default="speed,global", help="allocation strategies of the slims")
    ap.add_argument("--workdir", help="models from `tvm_tuning.py --stage prepare` (else exported here)")
    ap.add_argument("--profile-threads", type=int,
                    help="measure each kernel's wall time at this many threads instead of predicting")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.profile_threads or 1)  # before TVM starts its thread pool

    import graphprune

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tvm_tuning import _export_resnet18

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        models = {"resnet18": work / "resnet18.onnx"}
        if not models["resnet18"].exists():
            _export_resnet18(models["resnet18"], args.size)
        for strategy in args.strategies.split(","):
            path = work / ("resnet18_slim.onnx" if strategy == "speed" else f"resnet18_slim_{strategy}.onnx")
            if not path.exists():
                graphprune.prune(str(models["resnet18"]), target_flops=0.4, round_to=args.round_to,
                                 strategy=strategy).save(str(path))
            models[f"slim_{strategy}"] = path
        report = {"machine": platform.processor() or platform.machine(), "cores": args.cores,
                  "threads": args.profile_threads or 1, "fork_join_ms_assumed": FORK_JOIN_MS, "models": []}
        for name, path in models.items():
            row = analyse(name, path, args.cores, args.rounds, args.profile_threads, args.mcpu)
            print_report(row, args.cores)
            report["models"].append(row)
    base = report["models"][0]
    original_keys = {k["key"] for k in base["kernels"]}
    for row in report["models"][1:]:
        # record transfer: the slim's kernels with the original's structure and shapes reuse its records as they are
        shared = [k for k in row["kernels"] if k["key"] in original_keys]
        row["kernels_shared_with_original"] = len(shared)
        row["shared_t1_ms"] = sum(k.get("t1_ms") or 0.0 for k in shared)
        print(f"{row['model']}: {len(shared)}/{len(row['kernels'])} kernels shared with the original "
              f"({row['shared_t1_ms']:.2f} of {row.get('t1_ms', 0):.2f} ms on one thread)")
        for key in ("t1_ms", "predicted_ms", "predicted_no_fork_join_ms", "measured_kernels_ms", "ort_t1_ms"):
            if key in row:
                row[f"{key}_speedup_vs_original"] = base[key] / row[key]
                print(f"{row['model']}: {key} speed-up over the original {base[key] / row[key]:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
