"""GPU latency of original vs pruned torchvision models: PyTorch eager and torch.compile (and
onnxruntime when a CUDA execution provider is present), measured side by side in one process.

Run on the GPU machine (device tool); CPU works too for a smoke run:
    python benchmarks/gpu_latency.py --models resnet50 mobilenet_v2 --target 0.4 --batch 1 32
The pruned module comes from graphprune's PyTorch path (same analysis as the ONNX path).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def bench(fn, x, runs: int, sync) -> list[float]:
    for _ in range(10):
        fn(x)
    sync()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn(x)
        sync()
        out.append((time.perf_counter() - t) * 1000)
    return out


COLUMNS = ("model", "setting", "batch", "mode", "original ms", "pruned ms", "speed-up", "1/FLOPs ratio")


def cells(r: dict, round_to: int | None = None) -> list[str]:
    """One row of the table (terminal and docs). Early results files lack round_to/channels_last: the
    caller passes round_to from the file name then, and their layout was NCHW (no flag existed)."""
    layout = "channels_last" if r.get("channels_last") else "NCHW"
    return [r["model"], f"round_to {r.get('round_to', round_to)}, {layout}", str(r["batch"]), r["mode"],
            f"{r['original_ms']:.3f}", f"{r['pruned_ms']:.3f}", f"{r['speedup']:.2f}x", f"{1 / r['flops_ratio']:.2f}x"]


def markdown(files: list) -> str:
    """One docs table over several results files (benchmarks/render_docs.py), in the files' order."""
    from mdtable import md_table

    rows = []
    for f in map(Path, files):
        named = re.search(r"_r(\d+)", f.name)
        rows += [cells(r, int(named[1]) if named else None) for r in json.loads(f.read_text())]
    return md_table(COLUMNS, rows)


def main() -> None:
    import torch

    import graphprune
    from zoo import make_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--target", type=float, default=0.4)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (tensor-core friendly)")
    p.add_argument("--json", default="benchmarks/results/gpu_latency.json")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if dev == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        model = make_model(name).eval()
        example = torch.randn(1, 3, 224, 224)
        t = time.perf_counter()
        result = graphprune.prune(model, example, target_flops=args.target, round_to=args.round_to)
        prune_s = time.perf_counter() - t
        variants = {"original": model, "pruned": result.model.eval()}
        for bs in args.batch:
            x = torch.randn(bs, 3, 224, 224, device=dev, dtype=dtype)
            fmt = torch.channels_last if args.channels_last else torch.contiguous_format
            x = x.contiguous(memory_format=fmt)
            meds = {}
            for label, m in variants.items():
                m = m.to(dev, dtype).to(memory_format=fmt)
                with torch.inference_mode():
                    meds[(label, "eager")] = statistics.median(bench(m, x, args.runs, sync))
                    if not args.no_compile:
                        c = torch.compile(m)
                        meds[(label, "compile")] = statistics.median(bench(c, x, args.runs, sync))
            for mode in ("eager", "compile"):
                if ("original", mode) not in meds:
                    continue
                a, b = meds[("original", mode)], meds[("pruned", mode)]
                rows.append({"model": name, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                             "dtype": str(dtype), "batch": bs, "mode": mode, "round_to": args.round_to,
                             "channels_last": args.channels_last, "original_ms": a, "pruned_ms": b,
                             "speedup": a / b, "flops_ratio": result.report["macs"]["ratio"], "prune_s": prune_s})
                print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=2)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"GPU latency, target {args.target:.0%} FLOPs, round_to {args.round_to}")
        for c in COLUMNS:
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(*cells(r))
        Console(width=140).print(t)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
