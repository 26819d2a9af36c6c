"""Per-model table over the torchvision zoo (ONNX path) and resnet50 onnxruntime latency at 40% FLOPs.

    python benchmarks/prune_zoo.py                      # all 80 models + latency
    python benchmarks/prune_zoo.py --models resnet50 densenet121 --runs 30
    python benchmarks/prune_zoo.py --latency-only

Columns: coverage (share of the model's MACs in layers that a prunable group can shrink), time to
analyse and time for the whole prune (load + analyse + score + allocate + rewrite + validate),
FLOPs error |achieved - target|. Latency: onnxruntime, one thread, median of N runs after warm-up,
original and pruned measured side by side in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import graphprune  # noqa: E402
from graphprune.backends.ort_backend import sample_ort  # noqa: E402
from graphprune.rewrite.validate import random_feed  # noqa: E402


def coverage(analysis) -> float:
    prunable_tensors = {t for g in analysis.prunable_groups for t in g.tensors}
    total = sum(m.base for m in analysis.mac_terms) or 1.0
    return sum(m.base for m in analysis.mac_terms if prunable_tensors.intersection(m.tensors)) / total


def ort_latency(model_bytes: bytes, feed: dict, runs: int, threads: int = 1) -> list[float]:
    return sample_ort(model_bytes, feed, runs, warmup=3, intra_op_threads=threads)


def zoo_rows(models: list[str], directory: str, target: float) -> list[dict]:
    from zoo import export

    rows = []
    for name in models:
        row: dict = {"model": name}
        try:
            path = export(name, directory)
            t = time.perf_counter()
            analysis = graphprune.analyze(path)
            row["analyze_s"] = time.perf_counter() - t
            t = time.perf_counter()
            row["target"] = target
            try:
                result = graphprune.prune(path, target_flops=target)
            except graphprune.GraphpruneError as exc:
                # frozen attention can put the target below what is removable: prune to that floor
                floor = re.search(r"leaves ([0-9.]+) of the original", str(exc))
                if not floor:
                    raise
                row["target"] = float(floor.group(1)) + 0.01
                t = time.perf_counter()
                result = graphprune.prune(path, target_flops=row["target"])
            row["prune_s"] = time.perf_counter() - t
            row["coverage"] = coverage(analysis)
            row["gmacs"] = result.report["macs"]["before"] / 1e9
            row["achieved"] = result.report["achieved"]
            row["flops_error"] = abs(result.report["achieved"] - row["target"])
            row["groups"] = result.report["channels"]["groups"]
            row["prunable_groups"] = result.report["channels"]["prunable_groups"]
            row["ok"] = True
        except Exception as exc:  # report, keep going
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


CONFIGS = {
    "global": {},
    "global, round_to 8": {"round_to": 8},
    "uniform, round_to 8": {"strategy": "uniform", "round_to": 8},
}


def latency_rows(name: str, directory: str, target: float, runs: int) -> list[dict]:
    """Original vs pruned (per allocation config), interleaved in rounds so machine noise hits all alike."""
    from zoo import export

    path = export(name, directory)
    with open(path, "rb") as fh:
        original = fh.read()
    pruned = {label: graphprune.prune(path, target_flops=target, **kw) for label, kw in CONFIGS.items()}
    feed = random_feed(onnx.load(path), next(iter(pruned.values())).analysis.graph, seed=0)
    slim = {label: r.model.SerializeToString() for label, r in pruned.items()}
    base: list[float] = []
    samples: dict[str, list[float]] = {label: [] for label in slim}
    for _ in range(max(1, runs // 10)):
        base += ort_latency(original, feed, 10)
        for label, data in slim.items():
            samples[label] += ort_latency(data, feed, 10)
    med_a = statistics.median(base)
    rows = []
    for label, b in samples.items():
        ratio = pruned[label].report["macs"]["ratio"]
        rows.append({
            "model": name, "config": label, "runs": len(b), "threads": 1,
            "original_ms": med_a, "pruned_ms": statistics.median(b),
            "original_p90_ms": float(np.percentile(base, 90)), "pruned_p90_ms": float(np.percentile(b, 90)),
            "speedup": med_a / statistics.median(b), "flops_ratio": ratio, "flops_speedup": 1 / ratio,
        })
    return rows


ZOO_COLUMNS = ("model", "GMACs", "coverage", "groups (prunable)", "analyse s", "prune s", "achieved", "FLOPs error")
LATENCY_COLUMNS = ("model", "allocation", "runs", "original ms", "pruned ms", "speed-up", "FLOPs ratio", "1/FLOPs ratio")


def zoo_cells(r: dict, target: float) -> list[str]:
    """One model's row of the per-model table (terminal and docs alike)."""
    if not r["ok"]:
        return [r["model"], "-", "-", "-", "-", "-", "FAILED", r["error"][:40]]
    floor = "" if r["target"] == target else f" (floor {r['target']:.3f})"
    return [r["model"], f"{r['gmacs']:.2f}", f"{r['coverage']:.0%}", f"{r['groups']} ({r['prunable_groups']})",
            f"{r['analyze_s']:.2f}", f"{r['prune_s']:.2f}", f"{r['achieved']:.4f}{floor}", f"{r['flops_error']:.3%}"]


def latency_cells(r: dict) -> list[str]:
    return [r["model"], r["config"], str(r["runs"]), f"{r['original_ms']:.2f}", f"{r['pruned_ms']:.2f}",
            f"{r['speedup']:.2f}x", f"{r['flops_ratio']:.3f}", f"{r['flops_speedup']:.2f}x"]


def markdown(out: dict) -> str:
    """The docs' tables of a results file (benchmarks/render_docs.py): latency first, then the zoo."""
    from mdtable import md_table

    parts = []
    if out.get("latency"):
        parts.append(md_table(LATENCY_COLUMNS, [latency_cells(r) for r in out["latency"]]))
    if out.get("zoo"):
        targets = [r["target"] for r in out["zoo"] if r["ok"]]
        target = max(set(targets), key=targets.count)  # the run's target; floors differ from it
        parts.append(md_table(ZOO_COLUMNS, [zoo_cells(r, target) for r in out["zoo"]]))
    return "\n\n".join(parts)


def main() -> None:
    import torchvision
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--target", type=float, default=0.4)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--latency-models", nargs="*", default=["resnet50"])
    p.add_argument("--latency-only", action="store_true")
    p.add_argument("--zoo-dir", default=os.environ.get("GRAPHPRUNE_ZOO_DIR") or os.path.join(tempfile.gettempdir(), "graphprune-zoo"))
    p.add_argument("--json", default="benchmarks/results/prune_zoo.json")
    args = p.parse_args()
    os.makedirs(args.zoo_dir, exist_ok=True)
    console = Console(width=160)
    out: dict = {}
    if not args.latency_only:
        models = args.models or torchvision.models.list_models(module=torchvision.models)
        rows = zoo_rows(models, args.zoo_dir, args.target)
        out["zoo"] = rows
        table = Table(title=f"ONNX path, target {args.target:.0%} FLOPs")
        for c in ZOO_COLUMNS:
            table.add_column(c, justify="left" if c == "model" else "right")
        for r in rows:
            table.add_row(*zoo_cells(r, args.target))
        console.print(table)
        ok = [r for r in rows if r["ok"]]
        console.print(f"{len(ok)}/{len(rows)} models pruned; max FLOPs error {max(r['flops_error'] for r in ok):.3%}")
    lat = [row for m in args.latency_models for row in latency_rows(m, args.zoo_dir, args.target, args.runs)]
    out["latency"] = lat
    table = Table(title="onnxruntime latency, 1 thread, median")
    for c in LATENCY_COLUMNS:
        table.add_column(c, justify="right")
    for r in lat:
        table.add_row(*latency_cells(r))
    console.print(table)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
