"""Accuracy vs FLOPs: ResNet-20 on upsampled digits, pruned by L1, DI, HFP, SSR, HBFP (and
Torch-Pruning's L1 if installed), each fine-tuned with the same epoch budget.

Budget per run after the base model: `method_epochs + ft_epochs`. One-shot methods (L1, DI,
Torch-Pruning) prune first and fine-tune for all of it; training-based methods (HFP, SSR, HBFP)
spend `method_epochs` in their own procedure, then fine-tune `ft_epochs`. Pruned channels are
masked (exactly what the physically pruned model computes); FLOPs are counted from the kept
channels by the dependency analysis' cost model, and for seed 0 the plan is also applied with
`graphprune.prune` and the slim model's accuracy checked against the masked one.

    python benchmarks/accuracy.py --quick              # CPU, a few minutes
    python benchmarks/accuracy.py --device cuda        # full version
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar_resnet import resnet20  # noqa: E402
from digits import load_digits_split  # noqa: E402

from graphprune.passes.channels import ChannelSpace, Masker, plan_from_scores, space_of  # noqa: E402
from graphprune.passes.di import di_greedy_plan, torch_features  # noqa: E402
from graphprune.passes.hbfp import HBFPConfig, NormHistory, hbfp  # noqa: E402
from graphprune.passes.hfp import HFPConfig, hfp  # noqa: E402
from graphprune.passes.ssr import SSRConfig, ssr  # noqa: E402
from graphprune.passes.training import TrainConfig, evaluate, train  # noqa: E402

METHODS = ["l1", "di", "hfp", "ssr", "hbfp", "torch_pruning"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small CPU version")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--size", type=int, help="image side after upsampling")
    p.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.2], help="FLOPs fractions kept")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--base-epochs", type=int)
    p.add_argument("--method-epochs", type=int)
    p.add_argument("--ft-epochs", type=int)
    p.add_argument("--kd", type=float, default=0.0, help="distillation weight from the unpruned model")
    p.add_argument("--label-free", action="store_true",
                   help="no labels after the base model: every method trains on distillation from it alone")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--calib", type=int, default=512, help="DI calibration samples")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on a CPU run: no oversubscription)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    quick = dict(seeds=[0, 1], size=12, base_epochs=12, method_epochs=2, ft_epochs=2)
    full = dict(seeds=[0, 1, 2], size=32, base_epochs=40, method_epochs=8, ft_epochs=12)
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.calib = min(a.calib, 256)
    return a


def tp_prune(model: torch.nn.Module, example: torch.Tensor, target: float) -> torch.nn.Module:
    """Torch-Pruning global group-L1 pruning, ratio bisected to the FLOPs target (physical)."""
    import torch_pruning as tp

    base_macs, _ = tp.utils.count_ops_and_params(model, example)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=mid, global_pruning=True, ignored_layers=[m.fc])
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(m, example)
        if macs / base_macs <= target:
            hi, best = mid, (m, macs / base_macs)
        else:
            lo = mid
    if best is None:
        raise RuntimeError("torch_pruning could not reach the target")
    return best[0], best[1]


def train_base(tr, seed: int, epochs: int, lr: float, device: str, progress: bool = False):
    """The unpruned ResNet-20 of one seed, its channel space and its filter-norm history (HBFP)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    base = resnet20()
    space = space_of(base, tr.x[:1])
    history = NormHistory(space)
    train(base, tr.x, tr.y, TrainConfig(epochs=epochs, lr=lr, device=device, progress=progress,
                                        desc=f"base seed {seed}"), after_epoch=history, seed=seed)
    return base, space, history


def _fresh(model: torch.nn.Module):
    import graphprune

    return graphprune.analyze(copy.deepcopy(model).cpu(), torch.zeros(1, 1, 16, 16))


def run_method(method: str, base: torch.nn.Module, space: ChannelSpace, history: NormHistory, tr, target: float,
               a: argparse.Namespace, seed: int) -> dict:
    dev, prog = a.device, not a.no_progress
    label_free = getattr(a, "label_free", False)
    teacher = base if a.kd > 0 or label_free else None
    cfg = lambda epochs, desc: TrainConfig(epochs=epochs, lr=a.lr, device=dev, kd_alpha=a.kd,  # noqa: E731
                                           label_free=label_free, progress=prog, desc=desc)
    if label_free:  # no labels anywhere: DI's classes are the unpruned model's predictions, y is never read
        tr = type(tr)(tr.x, teacher_labels(base, tr.x, dev))
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    ft_epochs = a.ft_epochs
    if method == "l1":
        removed = plan_from_scores(space, _l1_of(m), {"macs": target})
        ft_epochs += a.method_epochs
    elif method == "di":
        idx = torch.randperm(len(tr.y), generator=torch.Generator().manual_seed(seed))[: a.calib]
        feats = torch_features(m, space, tr.x[idx], device=dev)
        removed = di_greedy_plan(space, feats, tr.y[idx].numpy(), target, progress=prog)
        ft_epochs += a.method_epochs
    elif method == "hfp":
        m, removed, _ = hfp(m, space, tr.x, tr.y, HFPConfig({"macs": target}), cfg(a.method_epochs, "hfp gates"),
                            teacher, seed)
    elif method == "ssr":
        m, removed, _ = ssr(m, space, tr.x, tr.y, SSRConfig(target, reg="l20", rho=0.1), cfg(a.method_epochs, "ssr aulm"),
                            teacher, seed)
    elif method == "hbfp":
        hist = copy.deepcopy(history)
        rounds = 2  # one filter per pair: a round removes at most half of a layer
        m, removed, _ = hbfp(m, space, tr.x, tr.y, hist, HBFPConfig(target, lam=1.0, rounds=rounds),
                             cfg(max(1, a.method_epochs // rounds), "hbfp pairs"), teacher=teacher, seed=seed)
    elif method == "torch_pruning":
        m, ratio = tp_prune(m.cpu(), tr.x[:1], target)
        train(m, tr.x, tr.y, cfg(a.ft_epochs + a.method_epochs, "tp finetune"), teacher=teacher, seed=seed)
        return {"macs": ratio, "params": float("nan"), "removed": None, "model": m,
                "time_s": time.perf_counter() - t0}
    else:
        raise ValueError(method)
    masker = Masker(m, space, removed)
    train(m, tr.x, tr.y, cfg(ft_epochs, f"{method} finetune"), teacher=teacher,
          after_step=lambda _s: masker.apply(), seed=seed)
    return {"macs": space.ratio("macs", removed), "params": space.ratio("params", removed), "removed": removed,
            "model": m, "time_s": time.perf_counter() - t0}


def teacher_labels(model: torch.nn.Module, x: torch.Tensor, device: str) -> torch.Tensor:
    """The model's own top-1 predictions (pseudo-labels for label-free runs)."""
    model.to(device).eval()
    with torch.no_grad():
        return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(512)])


def _l1_of(model: torch.nn.Module) -> dict[int, float]:
    from graphprune.passes.magnitude import l1

    return l1(_fresh(model))


def check_slim(model: torch.nn.Module, removed: frozenset[int], te, masked_acc: float, device: str) -> float:
    """Apply the plan with graphprune.prune (physical removal) and compare accuracy with masking."""
    import graphprune

    slim = graphprune.prune(copy.deepcopy(model).cpu(), te.x[:1], removed=set(removed)).model
    acc = evaluate(slim, te.x, te.y, device)
    if abs(acc - masked_acc) > 1e-9:
        print(f"  warning: slim accuracy {acc:.4f} != masked {masked_acc:.4f}")
    return acc


def main() -> None:
    a = parse()
    if a.threads is None and a.device == "cpu":
        a.threads = 1
    if a.threads:
        torch.set_num_threads(a.threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
    methods = [m for m in a.methods if m != "torch_pruning" or _has_tp()]
    tr, te = load_digits_split(a.size)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for seed in a.seeds:
        base, space, history = train_base(tr, seed, a.base_epochs, a.lr * 2, a.device, not a.no_progress)
        base_acc = evaluate(base, te.x, te.y, a.device)
        print(f"seed {seed}: base accuracy {base_acc:.4f}")
        rows.append({"seed": seed, "method": "unpruned", "target": 1.0, "macs": 1.0, "params": 1.0, "acc": base_acc})
        for target in a.targets:
            for method in methods:
                r = run_method(method, base, space, history, tr, target, a, seed)
                acc = evaluate(r["model"], te.x, te.y, a.device)
                row = {"seed": seed, "method": method, "target": target, "macs": r["macs"], "params": r["params"],
                       "acc": acc, "time_s": r["time_s"]}
                if seed == a.seeds[0] and r["removed"] is not None:
                    row["slim_acc"] = check_slim(r["model"], r["removed"], te, acc, a.device)
                rows.append(row)
                print(f"  {method:14s} target {target:.2f}: FLOPs {r['macs']:.3f} acc {acc:.4f} ({r['time_s']:.0f}s)")
    total = time.perf_counter() - t_start
    table = summarize(rows)
    print_table(table, a, total)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = "accuracy_quick" if a.quick else "accuracy"
    name += "_label_free" if a.label_free else ""
    with open(Path(a.out) / f"{name}.json", "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items()}, "rows": rows, "summary": table, "total_s": total}, f,
                  indent=1, default=str)
    with open(Path(a.out) / f"{name}.md", "w") as f:
        f.write(markdown(table, a, total))


def _has_tp() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except Exception:
        return False
    return True


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = []
    for r in rows:
        k = (r["target"], r["method"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (-k[0], METHODS.index(k[1]) if k[1] in METHODS else -1))
    for target, method in keys:
        rs = [r for r in rows if r["target"] == target and r["method"] == method]
        accs = [r["acc"] for r in rs]
        out.append({"method": method, "target": target, "macs": mean(r["macs"] for r in rs),
                    "params": mean(r["params"] for r in rs), "acc_mean": mean(accs), "acc_std": pstdev(accs),
                    "accs": accs, "seeds": [r["seed"] for r in rs]})
    return out


def markdown(table: list[dict], a: argparse.Namespace, total: float) -> str:
    lines = [f"ResNet-20 on digits {a.size}x{a.size}, device {a.device}, seeds {a.seeds}, epochs base/method/ft "
             f"{a.base_epochs}/{a.method_epochs}/{a.ft_epochs}, kd {a.kd}, total {total:.0f}s", "",
             "| method | FLOPs target | FLOPs kept | params kept | accuracy mean ± std | per seed |",
             "|---|---|---|---|---|---|"]
    for r in table:
        params = "n/a" if r["params"] != r["params"] else f"{r['params']:.3f}"
        lines.append(f"| {r['method']} | {r['target']:.2f} | {r['macs']:.3f} | {params} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | "
                     f"{', '.join(f'{100 * x:.1f}' for x in r['accs'])} |")
    return "\n".join(lines) + "\n"


def print_table(table: list[dict], a: argparse.Namespace, total: float) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"accuracy vs FLOPs (digits {a.size}x{a.size}, seeds {a.seeds}, {total:.0f}s)")
    for col in ("method", "target", "FLOPs kept", "params kept", "acc % (mean ± std)", "per seed"):
        t.add_column(col)
    for r in table:
        params = "n/a" if r["params"] != r["params"] else f"{r['params']:.3f}"
        t.add_row(r["method"], f"{r['target']:.2f}", f"{r['macs']:.3f}", params,
                  f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}", ", ".join(f"{100 * x:.1f}" for x in r["accs"]))
    Console().print(t)
    print(markdown(table, a, total))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
