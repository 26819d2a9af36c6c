"""Speed of pruning LayerNorm-coupled channels: norm_channels "freeze" vs "prune" vs Torch-Pruning.

ConvNeXt's residual stream feeds LayerNorms. With norm_channels "freeze" only its MLP hidden channels are
prunable; with "prune" (statistics over the kept channels) the stream is too, as Torch-Pruning does.
Each model (torchvision, random weights; benchmarks/peer_latency.py's setup) is pruned to the FLOPs
target both ways (default settings otherwise), with "prune" and --strategy global (the importance order
alone), and by Torch-Pruning (round_to 8, ratio bisected to the
"prune" plan's MACs); speed-up over the original from interleaved medians of
  - onnxruntime CPU time, 1 intra-op thread (ONNX path), and
  - with a GPU: PyTorch fp16, channels-last, CUDA graphs, batch 128 (nn.Module path, cuda-fp16 table).

    python benchmarks/norm_channels_speed.py --out benchmarks/results/norm_channels_speed.json
    python benchmarks/norm_channels_speed.py --quick --size 64 --out /tmp/n.json     # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

# (key, norm_channels, strategy): the two settings at default strategy, and "prune" with the global order
VARIANTS = (("freeze", "freeze", "speed"), ("prune", "prune", "speed"), ("prune_global", "prune", "global"))


def run_model(name: str, args: argparse.Namespace, work: Path, gpu: bool) -> dict:
    import torch

    import graphprune
    from peer_latency import _time_gpu_batch, export, source_model, time_cpu, tp_prune

    model, x, orig, base = source_model(name, args.size, work)
    row: dict = {"model": name, "macs": base}
    files = {"original": str(orig)}
    for key, mode, strategy in VARIANTS:
        r = graphprune.prune(str(orig), target_flops=args.target, norm_channels=mode, strategy=strategy, measure=False)
        r.save(work / f"{name}_{key}.onnx")
        files[key] = str(work / f"{name}_{key}.onnx")
        row[key] = {"macs_ratio": r.report["macs"]["ratio"], "prunable_groups": r.report["channels"]["prunable_groups"],
                     "norm_channels": r.report["norm_channels"]}
    tpm, tp_macs, ratio = tp_prune(model, x, row["prune"]["macs_ratio"] * base, args.tp_steps)
    export(tpm, x, work / f"{name}_tp.onnx")
    files["torch_pruning"] = str(work / f"{name}_tp.onnx")
    row["torch_pruning"] = {"macs_ratio": tp_macs / base, "pruning_ratio": ratio}
    row["cpu1"] = time_cpu({"files": files}, 1, args.rounds)
    if gpu:
        models = {"original": model}
        for key, mode, strategy in VARIANTS:
            g = graphprune.prune(model, x, target_flops=args.target, hardware="cuda-fp16", norm_channels=mode,
                                 strategy=strategy)
            models[key] = g.model.eval()
            row[key]["gpu_macs_ratio"] = g.report["macs"]["ratio"]
        models["torch_pruning"] = tpm.eval()
        try:
            row["gpu128"] = _time_gpu_batch(models, args.batch, args.size, args.gpu_rounds)
        except Exception as exc:  # noqa: BLE001 - the CPU rows stand on their own
            row["gpu128"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        torch.cuda.empty_cache()
    return row


def markdown(report: dict) -> str:
    """Speed-ups over the original per model: freeze / prune / prune with --strategy global / Torch-Pruning
    (benchmarks/render_docs.py)."""
    from mdtable import md_table

    keys = (*(k for k, _, _ in VARIANTS), "torch_pruning")

    def cell(d: dict | None) -> str:
        if not d or "speedup" not in d:
            return "-"
        return " / ".join(f"{d['speedup'][k]:.2f}x" for k in keys)

    rows = [[r["model"], " / ".join(f"{r[k]['macs_ratio']:.3f}" for k in keys),
             cell(r.get("cpu1")), cell(r.get("gpu128"))] for r in report["models"]]
    what = "freeze / prune / prune global / TP"
    return md_table(["model", f"FLOPs kept: {what}", f"ORT 1 thread: {what}", f"GPU fp16 b{report['batch']}: {what}"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["convnext_tiny"])
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--gpu-rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tp-steps", type=int, default=12)
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="Few rounds and steps: a smoke run, not results.")
    ap.add_argument("--out", type=Path, required=True)
    # device_speed.sh forwards peer_latency.py's extra arguments (e.g. --quick): the shared ones apply here
    args, ignored = ap.parse_known_args(argv)
    if ignored:
        print(f"norm_channels_speed.py: ignoring {' '.join(ignored)}", flush=True)
    if args.quick:
        args.rounds, args.gpu_rounds, args.tp_steps, args.batch = 3, 3, 4, 4
    import torch

    from peer_latency import header

    gpu = torch.cuda.is_available() and not args.no_gpu
    t0 = time.perf_counter()
    report = {**header(args, gpu, 0.0), "batch": args.batch}
    report.pop("prepare_s", None)
    report.pop("latency_wins", None)
    work = Path(tempfile.mkdtemp(prefix="norm-speed-"))
    for name in args.models:
        row = run_model(name, args, work, gpu)
        report["models"].append(row)
        print(json.dumps({"model": name, "cpu1": row["cpu1"]["speedup"],
                          "gpu": row.get("gpu128", {}).get("speedup")}), flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
