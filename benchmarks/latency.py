"""Original vs pruned latency for resnet50 and mobilenet_v2 (torchvision, random weights).

ORT: single thread, median of >= 20 runs. TVM: untuned and MetaSchedule-tuned (modest budget).
Pruned models come from `graphprune.prune(..., target_flops=...)`; pass `--pruned NAME=path.onnx`
to use a model pruned elsewhere. Prints a rich table and writes JSON.

    python benchmarks/latency.py --models resnet50 mobilenet_v2 --tvm --trials 64 --out latency.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx
from rich.console import Console
from rich.table import Table

from graphprune.backends.latency import LatencyStats, speedup
from graphprune.backends.macs import count_macs
from graphprune.backends.ort_backend import measure_ort, random_inputs
from graphprune.errors import GraphpruneError


def export_torchvision(name: str, out: Path, size: int = 224) -> Path:
    """Random-weight torchvision model -> ONNX (TorchScript exporter: fast, static shapes)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(out), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return out


def prune_model(path: Path, target_flops: float, out: Path) -> Path:
    import graphprune

    if not hasattr(graphprune, "prune"):
        raise GraphpruneError("graphprune.prune is not available yet; pass --pruned NAME=path.onnx")
    result = graphprune.prune(str(path), target_flops=target_flops)
    onnx.save(result.model, str(out))
    return out


def tvm_latencies(path: Path, trials: int, db: Path, runs: int, cores: int) -> dict:
    """Untuned and tuned TVM latency of one model; the database is shared across models."""
    from graphprune.backends import tvm_backend as tb

    target = tb.make_target("llvm", num_cores=cores)
    mod = tb.import_onnx(path)
    feeds, names = random_inputs(path), tb.graph_input_names(path)
    out: dict = {"untuned": tb.measure_tvm(tb.compile_untuned(mod, target), target, feeds, names, runs, 2)}
    if trials > 0:
        res = tb.tune(mod, target, db, trials)
        ex = tb.compile_tuned(mod, target, db)
        tb.check_against_ort(ex, target, path, rtol=1e-3, atol=1e-3)
        out["tuned"] = tb.measure_tvm(ex, target, feeds, names, runs, 2)
        out["tuning"] = {"new_trials": res.new_trials, "seconds": round(res.seconds, 1),
                         "kernels": len(res.tasks), "reused": len(res.reused_tasks)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--target-flops", type=float, default=0.4, help="Fraction of FLOPs to keep when pruning.")
    ap.add_argument("--pruned", action="append", default=[], metavar="NAME=PATH",
                    help="Use this pruned ONNX for NAME instead of calling graphprune.prune.")
    ap.add_argument("--runs", type=int, default=30, help="Timed runs (>= 20).")
    ap.add_argument("--tvm", action="store_true", help="Also measure TVM (untuned, and tuned if --trials > 0).")
    ap.add_argument("--trials", type=int, default=0, help="MetaSchedule trial budget per model (0: untuned only).")
    ap.add_argument("--cores", type=int, default=1, help="TVM cores (1 matches single-thread ORT).")
    ap.add_argument("--db", type=Path, default=Path("tuning_db"), help="Shared TVM tuning database.")
    ap.add_argument("--workdir", type=Path, help="Where ONNX files go (default: a temp dir).")
    ap.add_argument("--out", type=Path, default=Path("latency.json"))
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs must be >= 20")
    given = dict(p.split("=", 1) for p in args.pruned)
    console = Console()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="graphprune-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, report = [], {"runs": args.runs, "target_flops": args.target_flops, "models": {}}
    try:
        for name in args.models:
            orig = export_torchvision(name, workdir / f"{name}.onnx")
            slim = Path(given[name]) if name in given else prune_model(orig, args.target_flops,
                                                                      workdir / f"{name}_pruned.onnx")
            entry: dict = {"macs": {"original": count_macs(orig), "pruned": count_macs(slim)}}
            ort = {k: measure_ort(p, runs=args.runs, warmup=5, intra_op_threads=1) for k, p in
                   (("original", orig), ("pruned", slim))}
            entry["ort"] = {k: v.to_dict() for k, v in ort.items()}
            results = {"ORT 1 thread": ort}
            if args.tvm:
                t0 = time.perf_counter()
                tv = {k: tvm_latencies(p, args.trials, args.db, args.runs, args.cores)
                      for k, p in (("original", orig), ("pruned", slim))}
                entry["tvm"] = {k: {m: (s.to_dict() if isinstance(s, LatencyStats) else s) for m, s in v.items()}
                                for k, v in tv.items()}
                entry["tvm"]["seconds"] = round(time.perf_counter() - t0, 1)
                results["TVM untuned"] = {k: v["untuned"] for k, v in tv.items()}
                if args.trials > 0:
                    results[f"TVM tuned ({args.trials} trials)"] = {k: v["tuned"] for k, v in tv.items()}
            ratio = entry["macs"]["original"] / max(1, entry["macs"]["pruned"])
            for backend, pair in results.items():
                sp = speedup(pair["original"], pair["pruned"])
                rows.append((name, backend, pair["original"], pair["pruned"], sp, ratio))
            entry["speedups"] = {b: speedup(p["original"], p["pruned"]) for b, p in results.items()}
            entry["macs_ratio"] = ratio
            report["models"][name] = entry
    except GraphpruneError as exc:
        console.print(f"error: {exc}")
        return 2
    table = Table(title=f"original vs pruned latency (median of {args.runs}, ms)")
    for col in ("model", "backend", "original", "pruned", "speed-up", "MACs ratio"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for name, backend, a, b, sp, ratio in rows:
        table.add_row(name, backend, f"{a.median_ms:.2f} ±{a.spread_pct:.0f}%", f"{b.median_ms:.2f} ±{b.spread_pct:.0f}%",
                      f"{sp:.2f}x", f"{ratio:.2f}x")
    console.print(table)
    args.out.write_text(json.dumps(report, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
