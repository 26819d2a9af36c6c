"""Real-model checks for the cost model (issue 21) and exporter/quantised coverage (issue 13).

Models come from PyPI wheels cached under /work/cache (or --models DIR), e.g.
  pip download --no-deps -d /work/cache/wheels rapidocr-onnxruntime==1.4.4 ddddocr==1.6.1 silero-vad==6.2.3
then unzip the .onnx files into DIR/<package>-<version>/. The QDQ resnet18 is made here from
torchvision (random weights) with onnxruntime's quantize_static (per-channel, QDQ).

For each model: graphprune's achieved MAC ratio next to tests/independent_macs.py (run-time shapes
from onnxruntime, control flow as executed), the max |pruned - consumer-masked| output difference,
and the prunable group count. Writes benchmarks/results/real_models.json.

    python benchmarks/real_models.py [--models /work/cache/models]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import graphprune  # noqa: E402
from graphprune.frontends.onnx_frontend import load_onnx  # noqa: E402
from graphprune.rewrite.masking import mask_consumers_onnx  # noqa: E402
from graphprune.rewrite.validate import random_feed, run_onnx  # noqa: E402
from independent_macs import count_macs  # noqa: E402

CASES = [
    # (file under the models dir, input shapes, target)
    ("ddddocr-1.6.1/common.onnx", {"": (1, 1, 64, 256)}, 0.7),
    ("silero-vad-6.2.3/silero_vad_16k_sequence.onnx", {"input": (4, 576), "h": (1, 1, 128), "c": (1, 1, 128)}, 0.4),
    ("silero-vad-6.2.3/silero_vad_16k_op15.onnx", {"input": (1, 512), "state": (2, 1, 128)}, 0.4),
    ("rapidocr-1.4.4/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"": (1, 3, 48, 192)}, 0.5),
    ("rapidocr-1.4.4/ch_PP-OCRv4_rec_infer.onnx", {"": (1, 3, 48, 320)}, 0.7),
]


QDQ = ("local/resnet18_qdq_perchannel.onnx", {"": (1, 3, 224, 224)}, 0.5)  # made by qdq_resnet18 below
COLUMNS = ("model (file under the models dir)", "input", "target", "achieved", "independent", "diff",
           "prunable groups")


def cells(r: dict) -> list[str]:
    """One row of the docs table. Rows written before "source"/"input" were recorded get them from CASES."""
    case = next((c for c in [*CASES, QDQ] if Path(c[0]).name == r["model"]), (r["model"], {"": ()}, None))
    shape = r.get("input") or next(iter(case[1].values()))
    return [r.get("source", case[0]), "x".join(map(str, shape)), f"{r['target']:g}", f"{r['achieved']:.5f}",
            f"{r['independent_ratio']:.5f}", f"{r['max_abs_diff_vs_masked']:.2g}",
            f"{r['prunable_groups']} / {r['groups']}"]


def markdown(rows: list[dict]) -> str:
    """The docs table of a results file (benchmarks/render_docs.py)."""
    from mdtable import md_table

    return md_table(COLUMNS, [cells(r) for r in rows])


def qdq_resnet18(out_dir: Path) -> Path:
    import torch
    import torchvision
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    dst = out_dir / Path(QDQ[0]).name
    size = QDQ[1][""]
    if dst.exists():
        return dst
    torch.manual_seed(0)
    src = out_dir / "resnet18.onnx"
    torch.onnx.export(torchvision.models.resnet18(weights=None).eval(), torch.randn(*size), str(src),
                      opset_version=17, dynamo=False)
    name = onnx.load(src).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{name: np.random.default_rng(i).standard_normal(size).astype(np.float32)}
                            for i in range(8)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return dst


def check(path: Path, shape: dict, target: float) -> dict:
    t0 = time.perf_counter()
    result = graphprune.prune(str(path), target_flops=target, input_shape=shape)
    loaded = load_onnx(str(path), shape)
    feed = random_feed(loaded.proto, loaded.graph, 1)
    masked = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    pruned = run_onnx(result.model, feed)[0]
    before, after = count_macs(onnx.load(path), feed), count_macs(result.model, feed)
    rep = result.report
    return {
        "model": str(path.name), "target": target, "achieved": rep["achieved"],
        "independent_macs_before": before, "independent_macs_after": after, "independent_ratio": after / before,
        "abs_gap": abs(rep["achieved"] - after / before),
        "max_abs_diff_vs_masked": float(np.abs(masked - pruned).max()), "output_max_abs": float(np.abs(masked).max()),
        "groups": rep["channels"]["groups"], "prunable_groups": rep["channels"]["prunable_groups"],
        "cost_exact": rep["cost_model"]["exact"], "uncounted": rep["cost_model"]["uncounted_ops"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/work/cache/models")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_models.json"))
    args = ap.parse_args()
    models = Path(args.models)
    rows = []
    for rel, shape, target in CASES:
        path = models / rel
        if not path.exists():
            print(f"skip {rel}: not under {models}")
            continue
        rows.append({**check(path, shape, target), "source": rel, "input": next(iter(shape.values()))})
        print(json.dumps(rows[-1]))
    local = models / "local"
    local.mkdir(parents=True, exist_ok=True)
    rows.append({**check(qdq_resnet18(local), {}, QDQ[2]), "source": QDQ[0], "input": QDQ[1][""]})
    print(json.dumps(rows[-1]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
