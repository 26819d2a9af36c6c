"""Peak memory of `graphprune MODEL --target-params T -o OUT` on big external-data models.

Issue 18: a 2.15 GB model used to peak at 10.6-15.5 GB, and outputs over 2 GB could not be written.
Each model is a Conv(3x3)+Relu chain built straight to disk (tests/big_models.py); each prune runs
in its own process and its peak resident set (ru_maxrss, which counts memory-mapped pages that
are resident) is read with wait4. A tiny model's run gives the interpreter + onnxruntime baseline.

    nice python benchmarks/big_model_memory.py --sizes 288 2260 --dir /var/tmp

Writes benchmarks/results/big_model_memory.json. Needs about 4x the largest size in free disk.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from big_models import conv_chain_external, prune_peak_mb  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "big_model_memory.json")
# (channels, layers) per approximate size in MB: 3x3 convs, 36 * channels^2 bytes per layer
SHAPES = {288: (1024, 9), 2260: (2048, 16)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", type=int, default=[288, 2260], choices=sorted(SHAPES))
    ap.add_argument("--target-params", default="0.97")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the models are built (needs disk)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()

    rows = []
    work = tempfile.mkdtemp(prefix="big-model-memory-", dir=args.dir)
    try:
        tiny = os.path.join(work, "tiny.onnx")
        conv_chain_external(tiny, channels=64, layers=3)
        # baseline without the speed-up timing, which big (memory-mapped) models skip as well
        base = prune_peak_mb(tiny, os.path.join(work, "tiny_out.onnx"), args.target_params, work, "--no-measure")
        for size in args.sizes:
            channels, layers = SHAPES[size]
            src, out = os.path.join(work, f"m{size}.onnx"), os.path.join(work, f"m{size}_out.onnx")
            model_bytes = conv_chain_external(src, channels=channels, layers=layers)
            t0 = time.perf_counter()
            peak = prune_peak_mb(src, out, args.target_params, work)
            wall = time.perf_counter() - t0
            out_bytes = os.path.getsize(out + ".data") + os.path.getsize(out)
            model_mb = model_bytes / 2**20
            rows.append({"model_mb": round(model_mb, 1), "output_mb": round(out_bytes / 2**20, 1),
                         "over_2gb": {"model": model_bytes > 2**31, "output": out_bytes > 2**31},
                         "peak_rss_mb": round(peak, 1), "peak_over_model": round(peak / model_mb, 3),
                         "peak_minus_baseline_over_model": round((peak - base) / model_mb, 3),
                         "wall_s": round(wall, 1), "conv_channels": channels, "layers": layers})
            print(json.dumps(rows[-1]), flush=True)
            for f in (src, src + ".data", out, out + ".data"):
                os.unlink(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "big_model_memory", "target_params": float(args.target_params), "baseline_rss_mb": round(base, 1),
           "python": platform.python_version(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
