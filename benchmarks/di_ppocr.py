"""DI on the PP-OCRv4 recogniser (SVTR neck with channels-last tensors, 6625-class output, static
batch 1): plan time and peak memory at 0.9 and 0.6 FLOPs with 256 calibration lines.

    python benchmarks/di_ppocr.py [--model PATH] [--samples 256] [--targets 0.9,0.6]

Model: rapidocr_onnxruntime 1.4.4's ch_PP-OCRv4_rec_infer.onnx (`pip download --no-deps -d
/work/cache/wheels rapidocr-onnxruntime==1.4.4`, or /work/cache/models/rapidocr-1.4.4/).
Calibration lines: random words, digits and punctuation rendered with Pillow in the DejaVu fonts
(sizes, offsets and grey levels vary), resized to height 48 and padded to 1x3x48x320, normalised
like PaddleOCR ((x/255 - 0.5) / 0.5).
Labels (DI needs classes): pseudo-labels from the original model, the greedy CTC decoding's first
character of each line (argmax per timestep, blanks and repeats dropped); a line that decodes to
nothing gets the blank class 0. Characters seen once still add between-class scatter.
The model declares dynamic dims; it is analysed at 1x3x48x320 (input_shape, static batch 1, so
calibration lines go through onnxruntime one at a time). Each target runs
graphprune.prune(..., method="di") in a fresh process; peak RSS of that process
is reported. Results: benchmarks/results/di_ppocr.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

DEFAULT_MODEL = "/work/cache/models/rapidocr-1.4.4/ch_PP-OCRv4_rec_infer.onnx"
HERE = os.path.dirname(os.path.abspath(__file__))


def render_lines(n: int, seed: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVuSans*.ttf")) or [None]
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list(".,:-/()%")
    out = np.empty((n, 3, 48, 320), dtype=np.float32)
    for i in range(n):
        words = ["".join(rng.choice(alphabet, int(rng.integers(2, 9)))) for _ in range(int(rng.integers(1, 4)))]
        text = " ".join(words)
        size = int(rng.integers(22, 34))
        path = fonts[int(rng.integers(len(fonts)))]
        font = ImageFont.truetype(path, size) if path else ImageFont.load_default()
        w = int(font.getlength(text)) + 16
        fg, bg = int(rng.integers(0, 90)), int(rng.integers(180, 256))
        img = Image.new("RGB", (max(w, 32), size + 12), (bg, bg, bg))
        ImageDraw.Draw(img).text((8 + int(rng.integers(0, 4)), 4), text, font=font, fill=(fg, fg, fg))
        h = 48
        nw = min(320, max(1, int(img.width * h / img.height)))
        img = img.resize((nw, h))
        arr = np.full((48, 320, 3), 0, dtype=np.float32)
        arr[:, :nw] = (np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5
        out[i] = arr.transpose(2, 0, 1)
    return out


def first_char_labels(model: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    labels = np.zeros(len(x), dtype=np.int64)
    for i in range(len(x)):
        seq = sess.run(None, {name: x[i: i + 1]})[0][0].argmax(-1)
        prev = 0
        for k in seq.tolist():
            if k != 0 and k != prev:
                labels[i] = k
                break
            prev = k
    return labels


def one(model: str, data: str, target: float) -> dict:
    import graphprune

    with np.load(data) as d:
        x, y = d["x"], d["y"]
    t = time.perf_counter()
    res = graphprune.prune(model, target_flops=target, method="di", calib=(x, y), input_shape={"x": (1, 3, 48, 320)},
                           progress=lambda m: print(m, file=sys.stderr, flush=True))
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"target": target, "macs_ratio": res.report["macs"]["ratio"], "removed": len(res.plan.removed),
            "plan_s": res.report["time"]["plan_s"], "total_s": time.perf_counter() - t,
            "cpu_s": r.ru_utime + r.ru_stime, "peak_rss_mb": r.ru_maxrss / 1024.0,
            "coverage_fallbacks": res.report["method_coverage"]["fallbacks"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--targets", default="0.9,0.6")
    ap.add_argument("--data", default="/tmp/graphprune-bench/ppocr_calib.npz")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "di_ppocr.json"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.model, a.one[0], float(a.one[1]))))
        return
    os.makedirs(os.path.dirname(a.data), exist_ok=True)
    if not os.path.exists(a.data):
        x = render_lines(a.samples)
        y = first_char_labels(a.model, x)
        np.savez(a.data, x=x, y=y)
    with np.load(a.data) as d:
        y = d["y"]
    rows = []
    for target in [float(v) for v in a.targets.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--model", a.model, "--one", a.data, str(target)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            row = {"target": target, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    meta = {"model": os.path.basename(a.model), "samples": int(len(y)), "label_classes": int(len(np.unique(y))),
            "labels": "first character of the original model's greedy CTC decoding", "loadavg": os.getloadavg()}
    with open(a.out + ".tmp", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
