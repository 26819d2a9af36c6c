"""Which allocation rule is fastest at equal FLOPs? A sweep of candidate settings, measured, one run.

For each torchvision model (random weights as in tests/zoo.py) pruned to 40% FLOPs:
  - CPU rows (ONNX path, `--hardware ort-cpu`, `--round-to auto`): strategy "global" (importance
    order), "speed" (importance scaled by MACs saved per estimated time saved, the exchange rate
    MACs-per-element fitted from the channel table) and "speed" with that rate doubled; timed on
    onnxruntime, 1 thread, interleaved medians, next to Torch-Pruning round_to 8 at equal FLOPs.
  - GPU rows (nn.Module path, `--hardware cuda-fp16`): global and speed at the table's multiple,
    speed with the rate tripled, speed and global at multiples of 64; PyTorch fp16, channels-last,
    CUDA graphs, batch 128 (and 32), interleaved, next to the same Torch-Pruning model.
The variants' names say what they are (e.g. "speed_k2" = speed, exchange rate x2; "global_r64" =
global at round_to 64; "speed_w1" = speed with one read per weight element added to the time estimate,
passes/time_proxy.py's weight_reads). Torch-Pruning's ratio is bisected as in benchmarks/peer_latency.py.

    python benchmarks/rule_sweep.py --out /tmp/sweep.json                        # GPU machine
    python benchmarks/rule_sweep.py --quick --models resnet18 --size 64 --out /tmp/s.json   # smoke run
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

from peer_latency import (MODELS, _time_gpu_batch, export, header, prepare_all, source_model,  # noqa: E402
                          time_cpu, tp_prune)

# name -> (strategy, round_to, exchange-rate factor[, weight reads per inference in the time estimate])
CPU_VARIANTS = {"global": ("global", "auto", 1.0), "speed": ("speed", "auto", 1.0), "speed_k2": ("speed", "auto", 2.0),
                "speed_w1": ("speed", "auto", 1.0, 1.0)}
GPU_VARIANTS = {"global": ("global", "auto", 1.0), "speed": ("speed", "auto", 1.0), "speed_k3": ("speed", "auto", 3.0),
                "speed_w1": ("speed", "auto", 1.0, 1.0),
                "speed_r64": ("speed", 64, 1.0), "global_r64": ("global", 64, 1.0),
                # --round-to auto with the table's multiple halved for groups narrower than twice it
                "speed_halved": ("speed", "halved", 1.0), "global_halved": ("global", "halved", 1.0)}


def _select() -> None:
    """Keep only the variants named in RULE_SWEEP_CPU / RULE_SWEEP_GPU (comma lists; unset: keep all)."""
    for env, table in (("RULE_SWEEP_CPU", CPU_VARIANTS), ("RULE_SWEEP_GPU", GPU_VARIANTS)):
        if env in os.environ:
            keep = set(filter(None, os.environ[env].split(",")))
            for k in [k for k in table if k not in keep]:
                del table[k]


_select()


def _prune(model, x, hardware: str, strategy: str, round_to, factor: float, target: float, weight_reads: float = 0.0):
    """graphprune.prune with the time estimate's exchange rate scaled by `factor` and `weight_reads`
    weight reads counted per inference (sweep knobs)."""
    import graphprune
    from graphprune.backends import channel_table
    from graphprune.passes import stages

    from unittest import mock

    from graphprune.passes import allocate

    def halving(analysis, multiple, *_args, **_kw):
        return allocate.group_multiples(analysis, multiple, halve=True), "halved for narrow groups"

    rate = channel_table.elem_macs(hardware) * factor
    kw = {"measure": False} if x is None else {}
    register = stages.register_time_proxy
    with mock.patch.object(stages, "elem_macs", lambda _hw: rate), \
            mock.patch.object(stages, "register_time_proxy", lambda a, k: register(a, k, weight_reads)), \
            mock.patch.object(allocate, "auto_multiples", halving if round_to == "halved" else allocate.auto_multiples):
        return graphprune.prune(model, x, target_flops=target, strategy=strategy,
                                round_to="auto" if round_to == "halved" else round_to, hardware=hardware, **kw)


def prepare(name: str, size: int, target: float, workdir: str, tp_steps: int, gpu: bool) -> dict:
    import torch

    import graphprune

    t0 = time.perf_counter()
    work = Path(workdir)
    model, x, orig, base = source_model(name, size, work)
    row: dict = {"model": name, "macs": base, "files": {"original": str(orig)}, "macs_ratio": {}, "gpu_files": {}}
    for key, (strategy, rt, factor, *wr) in CPU_VARIANTS.items():
        res = _prune(str(orig), None, "ort-cpu", strategy, rt, factor, target, *wr)
        res.save(work / f"{name}_{key}.onnx")
        row["files"][key] = str(work / f"{name}_{key}.onnx")
        row["macs_ratio"][key] = res.report["macs"]["ratio"]
    tpm, tp_macs, ratio = tp_prune(model, x, target * base, tp_steps)
    export(tpm, x, work / f"{name}_tp.onnx")
    torch.save(tpm, work / f"{name}_tp.pt")
    row["files"]["torch_pruning"] = str(work / f"{name}_tp.onnx")
    row["macs_ratio"]["torch_pruning"] = tp_macs / base
    row["tp_pruning_ratio"] = ratio
    if gpu:
        row["gpu_files"]["torch_pruning"] = str(work / f"{name}_tp.pt")
        for key, (strategy, rt, factor, *wr) in GPU_VARIANTS.items():
            try:
                res = _prune(model, x, "cuda-fp16", strategy, rt, factor, target, *wr)
            except graphprune.GraphpruneError as exc:  # e.g. round_to 64 cannot reach the target: a result
                row.setdefault("variant_errors", {})[f"gpu_{key}"] = str(exc)
                continue
            torch.save(res.model, work / f"{name}_gpu_{key}.pt")
            row["gpu_files"][key] = str(work / f"{name}_gpu_{key}.pt")
            row["macs_ratio"][f"gpu_{key}"] = res.report["macs"]["ratio"]
    row["prepare_s"] = round(time.perf_counter() - t0, 1)
    return row


def time_gpu(row: dict, batches: list[int], rounds: int, size: int) -> dict:
    import torch

    from zoo import make_model

    torch.backends.cudnn.benchmark = True
    models = {"original": make_model(row["model"]).eval()}
    for key, path in row["gpu_files"].items():
        models[key] = torch.load(path, weights_only=False).eval()
    out = {}
    for bs in batches:
        try:
            out[str(bs)] = _time_gpu_batch(models, bs, size, rounds)
        except Exception as exc:  # noqa: BLE001 - one batch's failure is a result
            out[str(bs)] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--gpu-rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--tp-steps", type=int, default=12)
    ap.add_argument("--workers", type=int, default=min(7, os.cpu_count() or 1))
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--quick", action="store_true", help="Few rounds and steps: a smoke run, not results.")
    ap.add_argument("--cpu-variants", nargs="*", choices=list(CPU_VARIANTS), default=list(CPU_VARIANTS))
    ap.add_argument("--gpu-variants", nargs="*", choices=list(GPU_VARIANTS),
                    default=["global", "speed", "speed_k3", "speed_r64", "global_r64"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    # spawned workers re-import this module: the selection travels in the environment
    os.environ["RULE_SWEEP_CPU"], os.environ["RULE_SWEEP_GPU"] = ",".join(args.cpu_variants), ",".join(args.gpu_variants)
    _select()
    if args.quick:
        args.rounds, args.gpu_rounds, args.tp_steps = 3, 3, 4
    import torch

    gpu = torch.cuda.is_available() and not args.no_gpu
    workdir = tempfile.mkdtemp(prefix="rule-sweep-")
    t0 = time.perf_counter()
    rows, failed = prepare_all(prepare, args, workdir, gpu)
    from graphprune.backends.channel_table import elem_macs

    report = header(args, gpu, time.perf_counter() - t0)
    report.update({"failed": failed, "cpu_variants": CPU_VARIANTS, "gpu_variants": GPU_VARIANTS,
                   "elem_macs": {hw: elem_macs(hw) for hw in ("ort-cpu", "cuda-fp16")}})
    for r in rows:
        r["cpu"] = time_cpu(r, 1, args.rounds)
        if gpu:
            r["gpu"] = time_gpu(r, args.batches, args.gpu_rounds, args.size)
        del r["files"], r["gpu_files"]
        report["models"].append(r)
        report["total_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # after each model: a timeout keeps what ran
        print(json.dumps({"model": r["model"], "cpu1": {k: round(v, 3) for k, v in r["cpu"]["speedup"].items()},
                          "gpu": {b: {k: round(v, 3) for k, v in g.get("speedup", {}).items()}
                                  for b, g in r.get("gpu", {}).items()}}), flush=True)
    print(render(report))
    return 0


def render(report: dict) -> str:
    """A compact summary: speed-up per variant (CPU 1 thread; GPU batch 128)."""
    lines = []
    for r in report["models"]:
        cpu = " ".join(f"{k}={v:.2f}" for k, v in r["cpu"]["speedup"].items())
        g = r.get("gpu", {}).get("128", {}).get("speedup", {})
        gpu = " ".join(f"{k}={v:.2f}" for k, v in g.items())
        lines.append(f"{r['model']}: CPU {cpu} | GPU b128 {gpu}")
    return "\n".join(lines)


LABELS = {"global": "global", "speed": "speed", "speed_k2": "speed, rate x2", "speed_k3": "speed, rate x3",
          "speed_r64": "speed, round_to 64", "global_r64": "global, round_to 64", "torch_pruning": "Torch-Pruning",
          "speed_halved": "speed, halved multiples", "global_halved": "global, halved multiples",
          "speed_w1": "speed, + weight reads"}


def markdown(report: dict) -> str:
    """The docs tables (benchmarks/render_docs.py): speed-up over the original per variant, CPU and GPU."""
    from mdtable import md_table

    cpu_keys = [*report["cpu_variants"], "torch_pruning"]
    out = [md_table(["model", *(f"ORT 1 thread: {LABELS[k]}" if i == 0 else LABELS[k] for i, k in enumerate(cpu_keys))],
                    [[r["model"], *(f"{r['cpu']['speedup'][k]:.2f}x" for k in cpu_keys)] for r in report["models"]])]
    gpu_rows = [r for r in report["models"] if "gpu" in r]
    if gpu_rows:
        gpu_keys = [*report["gpu_variants"], "torch_pruning"]
        for bs in gpu_rows[0]["gpu"]:
            rows = [[r["model"], *(f"{r['gpu'][bs]['speedup'][k]:.2f}x" if k in r["gpu"][bs].get("speedup", {})
                                   else "failed" for k in gpu_keys)] for r in gpu_rows]
            out.append(md_table([f"model (GPU batch {bs})", *(LABELS[k] for k in gpu_keys)], rows))
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
