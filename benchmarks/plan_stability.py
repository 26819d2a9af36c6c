"""Is a --target-latency plan the same from run to run? (onnxruntime CPU, 1 thread)

A latency target is met by measuring: a per-layer latency table, then the pruned model timed against
the original and the plan re-fitted (passes.latency_cost.fit_to_measured). Measurements are noisy, so
this runs the same command several times per model, each in a fresh process (fresh onnxruntime
sessions, as a user re-running the command gets), and records what varied: MACs kept, the measured
latency ratio, and whether the kept channels were identical.

    python benchmarks/plan_stability.py --models resnet18 mobilenet_v2 --repeats 5 --target 0.5   # fresh process per run
    python benchmarks/plan_stability.py --render benchmarks/results/plan_stability.json
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

ONE_RUN = r"""
import hashlib, json, sys
import graphprune
r = graphprune.prune(sys.argv[1], target_latency=float(sys.argv[2]))
kept = json.dumps(sorted(r.plan.removed))
lat = r.report["latency"]
print(json.dumps({"macs_kept": r.report["macs"]["ratio"], "params_kept": r.report["params"]["ratio"],
                  "measured_ratio": lat["ratio"], "predicted_ratio": lat.get("predicted_ratio"),
                  "fit_steps": len(lat.get("calibration", [])),
                  "plan_sha256": hashlib.sha256(kept.encode()).hexdigest()[:16]}))
"""


def run_model(name: str, directory: str, target: float, repeats: int) -> dict:
    from zoo import export, input_size

    path = export(name, directory)
    size = input_size(name)
    runs = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", ONE_RUN, path, str(target)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        runs.append(row)
        print(f"{name} run {i + 1}/{repeats}: MACs kept {row['macs_kept']:.4f}, measured {row['measured_ratio']:.4f}",
              file=sys.stderr)
    macs = [r["macs_kept"] for r in runs]
    measured = [r["measured_ratio"] for r in runs]
    return {
        "model": name, "size": size, "target_latency": target, "runs": runs,
        "macs_kept_min": min(macs), "macs_kept_max": max(macs),
        "macs_kept_spread_pts": 100 * (max(macs) - min(macs)),
        "measured_min": min(measured), "measured_max": max(measured),
        "measured_median": statistics.median(measured),
        "distinct_plans": len({r["plan_sha256"] for r in runs}),
    }


def render(data: dict) -> str:
    lines = [f"| model | runs | distinct plans | MACs kept (min-max) | spread (points) | measured latency ratio (min-max) |",
             "|---|---|---|---|---|---|"]
    for m in data["models"]:
        lines.append(f"| {m['model']} | {len(m['runs'])} | {m['distinct_plans']} | "
                     f"{100 * m['macs_kept_min']:.1f}-{100 * m['macs_kept_max']:.1f}% | {m['macs_kept_spread_pts']:.1f} | "
                     f"{m['measured_min']:.3f}-{m['measured_max']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--zoo-dir", default=os.environ.get("GRAPHPRUNE_ZOO_DIR") or os.path.join(tempfile.gettempdir(), "graphprune-zoo"))
    p.add_argument("--json", default="benchmarks/results/plan_stability.json")
    p.add_argument("--render", metavar="RESULTS", help="print the table of an existing results file and exit")
    args = p.parse_args()
    if args.render:
        print(render(json.load(open(args.render))))
        return
    os.makedirs(args.zoo_dir, exist_ok=True)
    import onnxruntime

    data = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "load_avg_1m": os.getloadavg()[0],
            "versions": {"graphprune": importlib.metadata.version("graphprune"), "onnxruntime": onnxruntime.__version__},
            "models": [run_model(m, args.zoo_dir, args.target, args.repeats) for m in args.models]}
    data["load_avg_1m_after"] = os.getloadavg()[0]
    with open(args.json, "w") as f:
        json.dump(data, f, indent=1)
    print(render(data))


if __name__ == "__main__":
    main()
