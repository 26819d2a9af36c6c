"""DI plan time and peak memory against channels and calibration size, original vs incremental.

    python benchmarks/di_scale.py [--quick] [--image 224] [--old-timeout 120]

Three sweeps, each configuration in a fresh process (peak RSS per run, no cross-talk):
* `layer`: one feature map of C channels (p*p = 4 dims each), N samples, cost linear in C,
  target 0.5: the search alone, original vs incremental, against C and N.
* `example`: the built-in 40-MMAC example CNN, 256 samples, 40 % FLOPs, original vs incremental.
* `torchvision`: mobilenet_v3_large and resnet50 (random weights, exported with dynamo=False,
  dynamic batch), N in {64, 256} calibration images, 40 % FLOPs: capture (onnxruntime, streamed)
  and search timed separately; the original runs with a time limit.

Labels: 10 classes; each image is noise plus a class-dependent colour shift, so DI has signal.
Results: benchmarks/results/di_scale.json (table in docs/methods.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # tests/di_reference.py: the original search


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_s() -> float:
    """User + system CPU seconds of this process (all threads): robust to a contended machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _data(n: int, image: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    shift = rng.normal(size=(10, 3, 1, 1)).astype(np.float32)
    x = rng.normal(size=(n, 3, image, image)).astype(np.float32) + shift[y]
    return x, y


def _export(name: str, cache: str) -> str:
    path = os.path.join(cache, f"{name}.onnx")
    if not os.path.exists(path):
        import torch
        import torchvision

        torch.manual_seed(0)
        m = getattr(torchvision.models, name)(weights=None).eval()
        torch.onnx.export(m, torch.zeros(1, 3, 224, 224), path + ".tmp", input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False, opset_version=17)
        os.replace(path + ".tmp", path)
    return path


def run_layer(impl: str, channels: int, n: int) -> dict:
    from graphprune.passes.channels import ChannelSpace, Slice

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    f = rng.normal(size=(n, channels, 4)) + 0.3 * rng.normal(size=(10, channels, 4))[y]
    slices = {c: [Slice("w", 0, (c,), "out")] for c in range(channels)}
    space = ChannelSpace(list(range(channels)), [list(range(channels))], slices, {"t": np.arange(channels)},
                         {"macs": [(1e6, ("t",))], "params": [(1e6, ("t",))]})
    base = _rss_mb()
    t, c = time.perf_counter(), _cpu_s()
    if impl == "old":
        import di_reference as ref

        plan = ref.di_greedy_plan(space, {"t": f}, y, 0.5)
    else:
        from graphprune.passes.di import di_greedy_plan

        plan = di_greedy_plan(space, {"t": f}, y, 0.5)
    return {"search_s": time.perf_counter() - t, "search_cpu_s": _cpu_s() - c, "removed": len(plan),
            "rss_before_mb": base}


def run_model(impl: str, model: str, n: int, image: int, target: float, cache: str) -> dict:
    import graphprune
    from graphprune.passes.channels import from_analysis

    if model == "example":
        from graphprune.examples import example_cnn

        src, image = example_cnn(), 32
    else:
        src = _export(model, cache)
    x, y = _data(n, image)
    an = graphprune.analyze(src)
    space = from_analysis(an)
    base = _rss_mb()
    t, c = time.perf_counter(), _cpu_s()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    if impl == "old":
        import di_reference as ref

        feats = ref.onnx_features(src, an, x)
        t_cap, c_cap = time.perf_counter() - t, _cpu_s() - c
        plan = ref.di_greedy_plan(space, feats, y, target)
    else:
        from graphprune.passes.di import di_search, onnx_feature_stats

        stats = onnx_feature_stats(src, an, x, y, space.classes, say=say)
        t_cap, c_cap = time.perf_counter() - t, _cpu_s() - c
        plan = di_search(space, stats, target, progress=say)
    total, total_cpu = time.perf_counter() - t, _cpu_s() - c
    return {"capture_s": t_cap, "search_s": total - t_cap, "total_s": total, "capture_cpu_s": c_cap,
            "search_cpu_s": total_cpu - c_cap, "total_cpu_s": total_cpu, "removed": len(plan),
            "macs_ratio": an.macs(plan) / an.macs(), "rss_before_mb": base, "macs": an.macs(),
            "classes": len(space.classes), "image": image}


def _child(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(args)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout_s": timeout, "finished": False}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}",
                "finished": False}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    out["finished"] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sweep (minutes)")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--old-timeout", type=float, default=120.0)
    ap.add_argument("--cache", default=os.environ.get("GRAPHPRUNE_BENCH_CACHE", "/tmp/graphprune-bench"))
    ap.add_argument("--only", default="layer,example,torchvision")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "di_scale.json"))
    a = ap.parse_args()
    if a.one:
        kind, *rest = json.loads(a.one)
        res = run_layer(*rest) if kind == "layer" else run_model(*rest)
        res["peak_rss_mb"] = _rss_mb()
        print(json.dumps(res))
        return
    os.makedirs(a.cache, exist_ok=True)
    only = set(a.only.split(","))
    rows = []

    def record(sweep: str, impl: str, args: list, timeout: float, **info) -> None:
        r = _child(args, timeout)
        r.update(sweep=sweep, impl=impl, **info)
        rows.append(r)
        print(json.dumps(r), flush=True)

    if "layer" in only:
        for n in ([256] if a.quick else [64, 256]):
            for c in ([64, 256, 1024] if a.quick else [64, 128, 256, 512, 1024, 2048]):
                record("layer", "new", ["layer", "new", c, n], 600, channels=c, samples=n)
                if c <= 512:
                    record("layer", "old", ["layer", "old", c, n], a.old_timeout, channels=c, samples=n)
    if "example" in only:
        for impl in ("new", "old"):
            record("example", impl, ["model", impl, "example", 256, 32, 0.4, a.cache], 600 if impl == "new"
                   else a.old_timeout, model="example", samples=256, target=0.4)
    if "torchvision" in only:
        for model in ("mobilenet_v3_large", "resnet50"):
            _export(model, a.cache)
            for n in ([256] if a.quick else [64, 256]):
                record("torchvision", "new", ["model", "new", model, n, a.image, 0.4, a.cache], 900,
                       model=model, samples=n, target=0.4)
            record("torchvision", "old", ["model", "old", model, 64, a.image, 0.4, a.cache], a.old_timeout,
                   model=model, samples=64, target=0.4)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(), "image": a.image, "python": platform.python_version(),
            "note": "shared 2-core machine; wall times include contention (see loadavg)"}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    prev = {}
    if os.path.exists(a.out):
        with open(a.out) as fh:
            prev = json.load(fh)
    keep = [r for r in prev.get("rows", []) if r["sweep"] not in only]
    with open(a.out + ".tmp", "w") as fh:
        json.dump({"meta": meta, "rows": keep + rows}, fh, indent=1)
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
