"""Would keeping every group at the full channel multiple beat `--round-to auto`'s halving of it for
small groups? Measured on onnxruntime, 1 thread, on this machine.

For each torchvision model (random weights, as in tests/zoo.py) at 40% FLOPs with l1 importance:
  - halved: the rule `--round-to auto` used before (the table's multiple, halved for groups narrower
    than twice it, passes.allocate.group_multiples(halve=True));
  - strict: `--round-to <the table's multiple>` for every group (a 16-wide group, or a grouped conv's
    16-channel groups, then stay whole instead of dropping to 8 channels that a blocked kernel pads back).
Timing: per-run CPU time of the calling thread (`time.thread_time`) in interleaved rounds. With one
intra-op thread onnxruntime runs the model on the calling thread, so CPU time is the latency without
the time the process waited for a core: on a shared machine that is the stable figure (wall-clock
medians there move by 10-20% between identical models). The strict model is timed twice (as "strict"
and "strict_again") to show what noise remains.

Strict is now the default (`--round-to auto`, passes.allocate.auto_multiples, halving only when the
target needs it), so "halved" reproduces the previous default by substituting the halving rule for
auto_multiples while pruning; results/round_to_rule.json was measured while halved was the default.

    python benchmarks/round_to_rule.py --out benchmarks/results/round_to_rule.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

MODELS = ["regnet_y_800mf", "efficientnet_b0", "mobilenet_v2"]


def cpu_time_medians(files: dict[str, str], rounds: int) -> dict[str, float]:
    """Median CPU ms per variant from interleaved rounds of 1-thread sessions."""
    from graphprune.backends.ort_backend import make_session, random_inputs

    feed = random_inputs(next(iter(files.values())))
    sessions = {k: make_session(f, 1) for k, f in files.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    samples: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.thread_time()
            s.run(None, feed)
            samples[k].append((time.thread_time() - t) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def one_model(name: str, target: float, size: int, rounds: int, work: Path) -> dict:
    import torch

    import graphprune
    from graphprune.backends.channel_table import channel_multiple
    from peer_latency import export
    from zoo import make_model

    torch.set_num_threads(1)
    orig = export(make_model(name).eval(), torch.randn(1, 3, size, size), work / f"{name}.onnx")
    from unittest import mock

    from graphprune.passes import allocate

    def halving(analysis, multiple, *_args, **_kw):
        return allocate.group_multiples(analysis, multiple, halve=True), "halved (previous default)"

    with mock.patch.object(allocate, "auto_multiples", halving):
        halved = graphprune.prune(str(orig), target_flops=target, measure=False)
    multiple = channel_multiple("ort-cpu")
    strict = graphprune.prune(str(orig), target_flops=target, round_to=multiple, measure=False)
    files = {"original": str(orig)}
    for key, result in (("strict", strict), ("halved", halved)):
        result.save(work / f"{name}_{key}.onnx")
        files[key] = str(work / f"{name}_{key}.onnx")
    files["strict_again"] = files["strict"]
    med = cpu_time_medians(files, rounds)
    return {"model": name, "multiple": multiple, "round_to_source": halved.report["round_to_source"],
            "macs_ratio": {"strict": strict.report["macs"]["ratio"], "halved": halved.report["macs"]["ratio"]},
            "cpu_ms": med, "speedup": {k: med["original"] / v for k, v in med.items() if k != "original"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "round_to_rule.json")
    args = ap.parse_args(argv)
    import onnxruntime
    import platform

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "onnxruntime": onnxruntime.__version__, "timing": "CPU time of 1-thread runs, interleaved medians",
              "target": args.target, "rounds": args.rounds, "models": []}
    with tempfile.TemporaryDirectory(prefix="round-to-rule-") as work:
        for name in args.models:
            row = one_model(name, args.target, args.size, args.rounds, Path(work))
            print(json.dumps({"model": name, "speedup": {k: round(v, 3) for k, v in row["speedup"].items()}}),
                  flush=True)
            report["models"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
