"""What each part of graphprune's default TVM schedule buys (issue 17), untuned, against onnxruntime.

resnet18 (random weights, 1x3x224x224) and its 40%-FLOPs slims (channel multiples 8 and 16), each
compiled three ways: the NCHW layout with the rule tiles of session 2, channels-last (NHWC) without
weight pre-packing, and channels-last with pre-packing (the default). One thread each, timed in CPU
time of the calling thread (TVM and onnxruntime both run a one-thread inference in it), the minimum
over rounds: on a shared 2-core machine wall-clock times varied 5x between runs, CPU time does not
count the time other processes hold the core.

    python benchmarks/tvm_schedules.py --out benchmarks/results/tvm_schedules_1t.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"nchw": {"GRAPHPRUNE_TVM_LAYOUT": "nchw", "GRAPHPRUNE_TVM_PREPACK": "0"},
            "nhwc": {"GRAPHPRUNE_TVM_LAYOUT": "nhwc", "GRAPHPRUNE_TVM_PREPACK": "0"},
            "nhwc_prepacked": {"GRAPHPRUNE_TVM_LAYOUT": "nhwc", "GRAPHPRUNE_TVM_PREPACK": "1"}}


def _min_cpu_ms(fn, rounds: int, per_round: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        fn()
        for _ in range(per_round):
            t = time.thread_time()
            fn()
            best = min(best, (time.thread_time() - t) * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--mcpu", default="native")
    ap.add_argument("--out", default="benchmarks/results/tvm_schedules_1t.json")
    args = ap.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = "1"  # before TVM starts its thread pool

    import onnxruntime as ort
    import tvm
    from tvm import relax

    import graphprune
    from graphprune.backends import tvm_backend as tb
    from graphprune.backends.ort_backend import random_inputs

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tvm_tuning import _export_resnet18

    target = tb.make_target("llvm", num_cores=1, mcpu=args.mcpu)
    report: dict = {"machine": platform.processor() or platform.machine(), "target": str(target), "threads": 1,
                    "clock": "thread CPU time, min over rounds", "rounds": args.rounds, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"resnet18": Path(tmp) / "resnet18.onnx"}
        _export_resnet18(models["resnet18"], args.size)
        for multiple in (8, 16):
            result = graphprune.prune(str(models["resnet18"]), target_flops=0.4, round_to=multiple)
            models[f"resnet18_slim_r{multiple}"] = Path(tmp) / f"slim{multiple}.onnx"
            result.save(str(models[f"resnet18_slim_r{multiple}"]))
            report[f"slim_r{multiple}_macs_ratio"] = result.plan.achieved
        for name, path in models.items():
            feeds = random_inputs(str(path))
            names = tb.graph_input_names(str(path))
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            row: dict = {"model": name, "ort_ms": _min_cpu_ms(lambda: sess.run(None, feeds), args.rounds)}
            mod = tb.import_onnx(path)
            for variant, env in VARIANTS.items():
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    ex = tb.compile_untuned(mod, target)
                finally:
                    for k, v in saved.items():
                        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
                tb.check_against_ort(ex, target, str(path), rtol=1e-3, atol=1e-3)
                vm = relax.VirtualMachine(ex, tvm.cpu())
                inputs = [tvm.runtime.tensor(feeds[n]) for n in names]
                row[f"tvm_{variant}_ms"] = _min_cpu_ms(lambda: vm["main"](*inputs), args.rounds)
                row[f"tvm_{variant}_over_ort"] = row[f"tvm_{variant}_ms"] / row["ort_ms"]
            print(json.dumps(row), flush=True)
            report["models"].append(row)
    base = report["models"][0]
    for row in report["models"][1:]:
        row["tvm_speedup_vs_original"] = base["tvm_nhwc_prepacked_ms"] / row["tvm_nhwc_prepacked_ms"]
        row["ort_speedup_vs_original"] = base["ort_ms"] / row["ort_ms"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
