"""What does strategy "speed" cost in accuracy? ResNet-20 trained here on sklearn digits (16x16), pruned to
FLOPs targets with strategy global and speed, without recovery (l1) and with activation-aware importance +
least-squares recovery (act + lsq, 256 calibration images); test accuracy relative to the original.

    python benchmarks/speed_order_accuracy.py --out benchmarks/results/speed_order_accuracy.json

One seed, one small model: a sign of direction, not a general accuracy claim.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    import graphprune
    from mdtable import write_results
    from digits import trained_resnet20
    from graphprune.passes.training import evaluate

    torch.set_num_threads(1)
    model, tr, te, base, train_s = trained_resnet20(args.epochs)
    report = {"model": "ResNet-20, sklearn digits 16x16", "epochs": args.epochs, "train_s": round(train_s, 1),
              "accuracy": base, "rows": []}
    calib = tr.x[torch.randperm(len(tr.x), generator=torch.Generator().manual_seed(1))[:256]]
    for target in args.targets:
        for strategy in ("global", "speed"):
            for label, kw in (("l1", {}), ("act + lsq", {"calib": calib, "recover": "lsq"})):
                res = graphprune.prune(model, tr.x[:1], target_flops=target, strategy=strategy, **kw)
                row = {"target": target, "strategy": strategy, "pipeline": label, "flops": res.plan.achieved,
                       "rel_acc": evaluate(res.model, te.x, te.y, "cpu") / base}
                print(json.dumps(row), flush=True)
                report["rows"].append(row)
    write_results(args.out, report, markdown)
    return 0


def markdown(report: dict) -> str:
    """Relative test accuracy per target and pipeline, global vs speed (benchmarks/render_docs.py)."""
    from mdtable import md_table

    keys = sorted({(r["target"], r["pipeline"]) for r in report["rows"]}, key=lambda k: (-k[0], k[1]))
    cell = {(r["target"], r["pipeline"], r["strategy"]): r for r in report["rows"]}
    rows = [[f"{t:.2f}", p, *(f"{100 * cell[(t, p, s)]['rel_acc']:.1f}% ({cell[(t, p, s)]['flops']:.3f})"
                               for s in ("global", "speed"))] for t, p in keys]
    return md_table(["FLOPs target", "pipeline", "global: rel. accuracy (FLOPs)", "speed: rel. accuracy (FLOPs)"], rows)


if __name__ == "__main__":
    sys.exit(main())
