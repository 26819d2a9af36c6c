"""What --target-latency gains over --target-flops at equal measured latency (onnxruntime, 1 thread).

For each model: prune with --target-latency T and measure the real latency ratio; then prune with
--target-flops over a grid, measure, and interpolate the FLOPs-targeted model that has the same
measured latency. At equal latency, the plan that keeps more MACs/params keeps more capacity.

    python benchmarks/latency_aware.py --models resnet50 mobilenet_v2 --target 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np
import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(__file__))

import graphprune  # noqa: E402
from graphprune.rewrite.validate import random_feed  # noqa: E402
from prune_zoo import ort_latency  # noqa: E402


def measured_ratio(original: bytes, slim: bytes, feed: dict, rounds: int) -> float:
    a, b = [], []
    for _ in range(rounds):
        a += ort_latency(original, feed, 8)
        b += ort_latency(slim, feed, 8)
    return statistics.median(b) / statistics.median(a)


def run(name: str, directory: str, target: float, rounds: int, round_to: int) -> dict:
    from zoo import export

    path = export(name, directory)
    original = open(path, "rb").read()
    lat = graphprune.prune(path, target_latency=target, round_to=round_to)
    feed = random_feed(onnx.load(path), lat.analysis.graph, seed=0)
    lat_ratio = measured_ratio(original, lat.model.SerializeToString(), feed, rounds)
    grid = []
    for f in (0.3, 0.4, 0.5, 0.6, 0.7):
        r = graphprune.prune(path, target_flops=f, round_to=round_to)
        grid.append((measured_ratio(original, r.model.SerializeToString(), feed, rounds),
                     r.report["macs"]["ratio"], r.report["params"]["ratio"]))
    grid.sort()
    xs = [g[0] for g in grid]
    flops_at = float(np.interp(lat_ratio, xs, [g[1] for g in grid]))
    params_at = float(np.interp(lat_ratio, xs, [g[2] for g in grid]))
    return {
        "model": name, "target_latency": target, "round_to": round_to,
        "latency_plan": {"predicted": lat.plan.achieved, "measured": lat_ratio,
                         "macs_kept": lat.report["macs"]["ratio"], "params_kept": lat.report["params"]["ratio"]},
        "flops_plan_at_same_latency": {"macs_kept": flops_at, "params_kept": params_at},
        "grid": [{"measured_latency": a, "macs_kept": b, "params_kept": c} for a, b, c in grid],
    }


COLUMNS = ("model", "predicted latency", "measured latency", "MACs kept (latency plan)",
           "MACs kept (FLOPs plan, same latency)", "params kept (latency / FLOPs plan)")


def cells(r: dict) -> list[str]:
    """One row of the table (terminal and docs)."""
    lp, fp = r["latency_plan"], r["flops_plan_at_same_latency"]
    return [r["model"], f"{lp['predicted']:.3f}", f"{lp['measured']:.3f}", f"{lp['macs_kept']:.3f}",
            f"{fp['macs_kept']:.3f}", f"{lp['params_kept']:.3f} / {fp['params_kept']:.3f}"]


def markdown(rows: list[dict]) -> str:
    """The docs table of a results file (benchmarks/render_docs.py)."""
    from mdtable import md_table

    return md_table(COLUMNS, [cells(r) for r in rows])


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--zoo-dir", default=os.environ.get("GRAPHPRUNE_ZOO_DIR") or os.path.join(tempfile.gettempdir(), "graphprune-zoo"))
    p.add_argument("--json", default="benchmarks/results/latency_aware.json")
    args = p.parse_args()
    os.makedirs(args.zoo_dir, exist_ok=True)
    rows = [run(m, args.zoo_dir, args.target, args.rounds, args.round_to) for m in args.models]
    t = Table(title=f"--target-latency {args.target} vs --target-flops at equal measured latency (ORT, 1 thread)")
    for c in COLUMNS:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*cells(r))
    Console(width=160).print(t)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
