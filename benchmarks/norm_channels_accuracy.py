"""What does pruning LayerNorm-coupled channels cost in accuracy? A tiny ConvNeXt-style net (depthwise
7x7 -> LayerNorm over channels -> MLP x4, layer scale, residual; LayerNorm + 2x2 conv downsampling;
widths 32/64/128) trained here on sklearn digits (32x32), exported to ONNX (LayerNormalization ops) and
pruned at equal FLOPs targets with
  - norm_channels "freeze" (the default: the residual streams, which feed LayerNorms, are kept; only
    the MLP hidden channels are prunable), and
  - norm_channels "prune" (the streams are prunable too; each LayerNorm then takes its statistics over
    the kept channels, and the pruned model equals the original masked that way),
each without recovery (l1) and with activation-aware importance + least-squares recovery (act + lsq,
256 calibration images); test accuracy (onnxruntime) relative to the original.

    python benchmarks/norm_channels_accuracy.py --out benchmarks/results/norm_channels_accuracy.json

One seed, one small model: a sign of direction, not a general accuracy claim.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def tiny_convnext(widths: tuple[int, ...] = (32, 64, 128), depths: tuple[int, ...] = (1, 2, 1), classes: int = 10):
    """ConvNeXt's block structure at digit scale (torchvision's CNBlock / LayerNorm2d layout)."""
    import torch
    from torch import nn

    class ChannelsLastNorm(nn.LayerNorm):
        """LayerNorm over the channels of an NCHW tensor (torchvision's LayerNorm2d)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
            self.norm = nn.LayerNorm(c, eps=1e-6)
            self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
            self.scale = nn.Parameter(torch.full((c, 1, 1), 0.1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.dw(x).permute(0, 2, 3, 1))
            y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
            return x + self.scale * y

    layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 2, stride=2), ChannelsLastNorm(widths[0], eps=1e-6)]
    for i, (w, d) in enumerate(zip(widths, depths)):
        if i:
            layers += [ChannelsLastNorm(widths[i - 1], eps=1e-6), nn.Conv2d(widths[i - 1], w, 2, stride=2)]
        layers += [Block(w) for _ in range(d)]
    layers += [nn.AdaptiveAvgPool2d(1), ChannelsLastNorm(widths[-1], eps=1e-6), nn.Flatten(), nn.Linear(widths[-1], classes)]
    return nn.Sequential(*layers)


def trained_model(epochs: int, seed: int = 0, size: int = 32):
    """(model, train split, test split, training seconds): AdamW from `seed`, in eval mode."""
    import torch

    from digits import load_digits_split

    torch.manual_seed(seed)
    tr, te = load_digits_split(size)
    model = tiny_convnext()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.05)
    steps = epochs * ((len(tr.x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(tr.x), generator=g)
        for k in range(0, len(perm), 64):
            idx = perm[k:k + 64]
            loss = torch.nn.functional.cross_entropy(model(tr.x[idx]), tr.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, tr, te, time.perf_counter() - t


def export(model, x, path: Path) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
    return path


def accuracy(model, x, y) -> float:
    """Top-1 accuracy of an ONNX model (path or ModelProto) on onnxruntime, one thread."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(data) if isinstance(data, Path) else data, opts, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x.numpy()})[0]
    return float((np.argmax(logits, 1) == y.numpy()).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.4, 0.3, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds (one model each).")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import torch

    import graphprune
    from mdtable import write_results

    torch.set_num_threads(1)
    report = {"model": "tiny ConvNeXt (32/64/128, depths 1/2/1), sklearn digits 32x32", "epochs": args.epochs,
              "seeds": {}, "rows": []}
    for seed in args.seeds:
        model, tr, te, train_s = trained_model(args.epochs, seed)
        work = Path(tempfile.mkdtemp(prefix="gp_normacc_"))
        path = export(model, tr.x[:1], work / "tiny_convnext.onnx")
        base = accuracy(str(path), te.x, te.y)
        report["seeds"][str(seed)] = {"accuracy": base, "train_s": round(train_s, 1)}
        print(json.dumps({"seed": seed, "accuracy": base, "train_s": round(train_s, 1)}), flush=True)
        calib = tr.x[torch.randperm(len(tr.x), generator=torch.Generator().manual_seed(1))[:256]].numpy()
        for target in args.targets:
            for norm in ("freeze", "prune"):
                for label, kw in (("l1", {}), ("act + lsq", {"calib": calib, "recover": "lsq"})):
                    row = {"seed": seed, "target": target, "norm_channels": norm, "pipeline": label}
                    try:
                        res = graphprune.prune(str(path), target_flops=target, norm_channels=norm, measure=False,
                                               input_shape={"input": (1, 1, 32, 32)}, **kw)
                    except graphprune.GraphpruneError as exc:
                        row["error"] = str(exc)
                    else:
                        row.update(flops=res.plan.achieved, prunable_groups=len(res.analysis.prunable_groups),
                                   rel_acc=accuracy(res.model, te.x, te.y) / base)
                    print(json.dumps(row), flush=True)
                    report["rows"].append(row)
    write_results(args.out, report, markdown)
    return 0


def markdown(report: dict) -> str:
    """Relative test accuracy per target and pipeline, freeze vs prune, one value per seed
    (benchmarks/render_docs.py)."""
    from mdtable import md_table

    keys = sorted({(r["target"], r["pipeline"]) for r in report["rows"]}, key=lambda k: (-k[0], k[1]))
    seeds = sorted({r["seed"] for r in report["rows"]})
    cell = {(r["target"], r["pipeline"], r["norm_channels"], r["seed"]): r for r in report["rows"]}

    def show(t: float, p: str, n: str) -> str:
        vals = []
        for s in seeds:
            r = cell.get((t, p, n, s))
            vals.append("-" if r is None else "n/r" if "error" in r else f"{100 * r['rel_acc']:.1f}%")
        flops = [cell[(t, p, n, s)]["flops"] for s in seeds if "flops" in cell.get((t, p, n, s), {})]
        return " / ".join(vals) + (f" ({max(flops):.3f})" if flops else "")

    rows = [[f"{t:.2f}", p, *(show(t, p, n) for n in ("freeze", "prune"))] for t, p in keys]
    head = "seed " + " / ".join(str(s) for s in seeds)
    return md_table(["FLOPs target", "pipeline", f"freeze: rel. accuracy, {head} (max FLOPs)",
                     f"prune: rel. accuracy, {head} (max FLOPs)"], rows)


if __name__ == "__main__":
    sys.exit(main())
