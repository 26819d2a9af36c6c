"""graphprune (torch.fx path) vs Torch-Pruning on torchvision models, side by side.

For each model: does each tool handle it, time to build the dependency graph, time to prune to
40% FLOPs, and the FLOPs error. FLOPs of both results are counted the same way: graphprune's
analysis (MACs) of the pruned module vs the original. Torch-Pruning has no FLOPs target, so it
uses its usual recipe: global L1 magnitude (MagnitudeImportance p=1), iterative_steps=50 up to
pruning_ratio 0.9, stepping until its own counter reports <= 40% MACs; the classifier is ignored.
graphprune uses global L1 with its FLOPs-targeted allocation. Needs `pip install .[bench]`.

    python benchmarks/torch_pruning_compare.py [--models resnet18,resnet50 | --models all] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import graphprune  # noqa: E402
from zoo import make_model  # noqa: E402

SUBSET = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "densenet121",
          "googlenet", "inception_v3", "regnet_y_400mf", "shufflenet_v2_x1_0", "squeezenet1_0", "mnasnet1_0",
          "convnext_tiny", "vit_b_32", "swin_t"]
TARGET = 0.4


def shared_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    return graphprune.analyze(model, x).macs()


def run_graphprune(model: torch.nn.Module, x: torch.Tensor, base: float) -> dict:
    t = time.perf_counter()
    analysis = graphprune.analyze(model, x)
    build = time.perf_counter() - t
    del analysis
    t = time.perf_counter()
    res = graphprune.prune(model, x, target_flops=TARGET, method="l1")
    total = time.perf_counter() - t
    with torch.no_grad():
        res.model.eval()(x)
    ratio = shared_macs(res.model, x) / base
    return {"ok": True, "build_s": build, "prune_s": total, "ratio": ratio, "error": abs(ratio - TARGET),
            "prunable_groups": res.report["channels"]["prunable_groups"], "groups": res.report["channels"]["groups"]}


def run_torch_pruning(model: torch.nn.Module, x: torch.Tensor, base: float) -> dict:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    t = time.perf_counter()
    tp.DependencyGraph().build_dependency(model, example_inputs=x)
    build = time.perf_counter() - t
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), global_pruning=True,
                                  pruning_ratio=0.9, iterative_steps=50, ignored_layers=ignored)
    tp_base, _ = tp.utils.count_ops_and_params(model, x)
    steps = 0
    for _ in range(50):
        pruner.step()
        steps += 1
        macs, _ = tp.utils.count_ops_and_params(model, x)
        if macs <= TARGET * tp_base:
            break
    total = time.perf_counter() - t
    with torch.no_grad():
        model.eval()(x)
    ratio = shared_macs(model, x) / base
    return {"ok": True, "build_s": build, "prune_s": total, "ratio": ratio, "error": abs(ratio - TARGET),
            "steps": steps, "tp_ratio": macs / tp_base}


def compare(names: list[str], size: int = 224) -> list[dict]:
    rows = []
    for name in names:
        model = make_model(name)
        x = torch.randn(1, 3, size, size)
        row = {"model": name}
        try:
            base = shared_macs(model, x)
        except Exception as exc:  # noqa: BLE001
            base = None
            row["base_error"] = f"{type(exc).__name__}: {exc}"
        for tool, fn in (("graphprune", run_graphprune), ("torch_pruning", run_torch_pruning)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[tool] = fn(model, x, base)
            except Exception as exc:  # noqa: BLE001
                row[tool] = {"ok": False, "reason": f"{type(exc).__name__}: {str(exc)[:200]}",
                             "trace": traceback.format_exc(limit=3)}
        rows.append(row)
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "trace"} if isinstance(v, dict) else v)
                          for k, v in row.items()}), flush=True)
    return rows


def render(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"graphprune (fx) vs Torch-Pruning, target {TARGET:.0%} FLOPs, global L1")
    for col in ("model", "gp build s", "gp prune s", "gp FLOPs", "tp build s", "tp prune s", "tp FLOPs", "tp steps"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        g, t = r["graphprune"], r["torch_pruning"]
        gcells = [f"{g['build_s']:.2f}", f"{g['prune_s']:.2f}", f"{g['ratio']:.3f}"] if g["ok"] else ["fail", g["reason"][:30], ""]
        tcells = ([f"{t['build_s']:.2f}", f"{t['prune_s']:.2f}", f"{t['ratio']:.3f}", str(t["steps"])]
                  if t["ok"] else ["fail", t["reason"][:30], "", ""])
        table.add_row(r["model"], *gcells, *tcells)
    Console().print(table)
    for tool in ("graphprune", "torch_pruning"):
        ok = [r[tool] for r in rows if r[tool]["ok"]]
        if ok:
            print(f"{tool}: {len(ok)}/{len(rows)} models, mean |FLOPs error| {sum(o['error'] for o in ok) / len(ok):.4f}, "
                  f"mean build {sum(o['build_s'] for o in ok) / len(ok):.2f}s, mean prune {sum(o['prune_s'] for o in ok) / len(ok):.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(SUBSET))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "torch_pruning_compare.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.models == "all":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
    else:
        names = args.models.split(",")
    rows = compare(names, args.size)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"target": TARGET, "size": args.size, "rows": rows}, f, indent=1)
    render(rows)


if __name__ == "__main__":
    main()
