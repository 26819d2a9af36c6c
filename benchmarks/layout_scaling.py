"""Analysis time and memory vs image size for a pixel-shuffle upsampler (issue 12).

    python benchmarks/layout_scaling.py [--sizes 16,64,512,2048] [--out benchmarks/results/layout_scaling.json]

Before compressed layout labels, a label per element made the 512x512 case take 83 s and 2.7 GB
(issue 12) and 2048x2048 did not fit the machine. Each size runs in a fresh process so peaks do
not inflate each other; analysis cost should be flat in the image size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys, tempfile, time, os
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
import onnx, hostile_models
import graphprune
size = int(sys.argv[1])
path = os.path.join(tempfile.mkdtemp(), "ps.onnx")
onnx.save(hostile_models.pixel_shuffle(size), path)
t = time.perf_counter()
analysis = graphprune.analyze(path)
dt = time.perf_counter() - t
print(json.dumps({"size": size, "load_and_analyze_s": round(dt, 3),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "largest_label_array": int(max(sp.ids.size for sp in analysis.ctx.spaces.values())),
                  "frozen_groups": sum(g.frozen for g in analysis.groups), "groups": len(analysis.groups)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16,64,512,2048")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "layout_scaling.json"))
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(size), root], capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    with open(args.out, "w") as fh:
        json.dump({"model": "pixel shuffle 3->16->256 (Reshape 1x64x2x2xHxW, Transpose, Reshape) ->3", "rows": rows},
                  fh, indent=1)


if __name__ == "__main__":
    main()
