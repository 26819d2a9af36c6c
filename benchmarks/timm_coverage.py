"""How many timm architectures prune to 40% FLOPs, per path: graphprune's PyTorch path, graphprune's
ONNX path (torch.onnx.export, dynamo=False), and Torch-Pruning 1.6 on the same models.

Success means, per path:
- graphprune (PyTorch): `graphprune.prune(model, x, target_flops=0.4)` returns, the pruned module
  runs, and equals the original with the removed channels' consumers zeroed (max abs diff <= 1e-3
  relative to the output scale). The frontend used (torch.fx or torch.export) is recorded.
- graphprune (ONNX): the exported file prunes to 0.4 (graphprune validates the result in onnxruntime).
- Torch-Pruning: MagnitudePruner (L1, uniform ratio, classifier ignored) stepped until its own MAC
  count is <= 0.4 of the original, and the pruned model runs with the original output shape. Its MAC
  counter is its own; no equivalence check (it has no masking reference).

Every model is built with pretrained=False at a small input (1x3x64x64, or the smallest the model
takes), so the run fits on two shared cores: `nice python benchmarks/timm_coverage.py` (a few
minutes per ten models). Writes benchmarks/results/timm_coverage.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

# (model name, family, input size): small members of each timm family
SAMPLE: list[tuple[str, str, int]] = [
    ("resnet18", "resnet", 64), ("resnext26ts", "byobnet", 64),
    ("skresnet18", "sknet", 64), ("resnest14d", "resnest", 64), ("resnetv2_50x1_bit", "resnetv2 (StdConv)", 64),
    ("nf_resnet26", "nfnet (ScaledStdConv)", 64), ("regnetx_002", "regnet", 64), ("regnety_002", "regnet", 64),
    ("regnetz_b16", "byobnet", 64), ("densenet121", "densenet", 64), ("dla34", "dla", 64), 
    ("vgg11", "vgg", 64), ("repvgg_a0", "byobnet", 64), ("mobileone_s0", "byobnet", 64),
    ("gernet_s", "byobnet", 64), ("cspresnet50", "cspnet", 64), 
    ("hrnet_w18_small", "hrnet", 64), ("selecsls42b", "selecsls", 64), ("ese_vovnet19b_dw", "vovnet", 64),
    ("hgnetv2_b0", "hgnet", 64), ("efficientnet_b0", "efficientnet", 64), ("efficientnetv2_rw_t", "efficientnet", 64),
    ("tf_efficientnet_b0", "efficientnet (same pad)", 64), ("mobilenetv2_050", "mobilenetv2", 64),
    ("mobilenetv3_small_050", "mobilenetv3", 64), ("mobilenetv4_conv_small", "mobilenetv4", 64),
    ("mnasnet_small", "efficientnet", 64), ("fbnetc_100", "efficientnet", 64), ("lcnet_050", "mobilenetv3", 64),
    ("tinynet_e", "efficientnet", 64), ("mixnet_s", "efficientnet (mixed conv)", 64),
    ("tf_mixnet_s", "efficientnet (mixed conv, same pad)", 64), ("hardcorenas_a", "mobilenetv3", 64),
    ("ghostnet_100", "ghostnet", 64), ("ghostnetv2_100", "ghostnet", 64), ("rexnet_100", "rexnet", 64),
    ("inception_v3", "inception", 96), ("convnext_atto", "convnext", 64),
    ("convnextv2_atto", "convnext", 64), ("edgenext_xx_small", "edgenext", 64), ("poolformer_s12", "metaformer", 64),
    ("fastvit_t8", "fastvit", 64), ("efficientvit_b0", "efficientvit", 64), ("mobilevit_xxs", "mobilevit", 64),
    ("mobilevitv2_050", "mobilevit", 64), ("vit_tiny_patch16_224", "vit", 64), ("deit_tiny_patch16_224", "deit", 64),
    ("convit_tiny", "convit", 64), ("pit_ti_224", "pit", 64), ("coatnet_nano_rw_224", "maxxvit", 64),
]
TARGET = 0.4
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "timm_coverage.json")


class Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise Timeout()


def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:240] if msg else ''}"


def _build(timm, name: str, size: int):
    kwargs = {}
    # the fixed-size transformers take the small input through img_size (not fastvit/efficientvit/mobilevit)
    if name.startswith(("vit_", "deit_", "convit", "pit_", "coatnet")):
        kwargs["img_size"] = size
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _flat(out):
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def run_torch(model, x) -> dict:
    import torch

    import graphprune
    from graphprune.rewrite.torch_rewrite import mask_consumers_module

    result = graphprune.prune(model, x, target_flops=TARGET, method="l1")
    masked = mask_consumers_module(model, result.analysis, result.plan.removed).eval()
    with torch.no_grad():
        ref, pruned = _flat(masked(x)), _flat(result.model(x))
    scale = max(max(r.abs().max().item() for r in ref), 1e-6)
    diff = max((p - r).abs().max().item() for p, r in zip(pruned, ref))
    ok = diff <= 1e-3 * scale
    return {"ok": ok, "achieved": result.report["achieved"], "frontend": result.report.get("frontend"),
            "max_rel_diff_vs_masked": diff / scale, **({} if ok else {"error": "pruned != consumer-masked original"})}


def run_onnx(model, x, tmp: str) -> dict:
    import torch

    import graphprune

    path = os.path.join(tmp, "model.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    except Exception as exc:  # the exporter's failure, not graphprune's: said so in the row
        return {"ok": False, "stage": "export", "error": "torch.onnx.export: " + _first_line(exc)}
    result = graphprune.prune(path, target_flops=TARGET, method="l1")
    return {"ok": True, "achieved": result.report["achieved"]}


def run_tp(model, x, classifier) -> dict:
    import torch
    import torch_pruning as tp

    base, _ = tp.utils.count_ops_and_params(model, x)
    steps = 6  # channel ratio 0.1 per step: MACs fall roughly as (1 - ratio)^2, 0.36 at step 4
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.6, iterative_steps=steps,
                                       ignored_layers=[classifier] if classifier is not None else [])
    macs = base
    for _ in range(steps):
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, x)
        if macs <= TARGET * base:
            break
    with torch.no_grad():
        out = _flat(model(x))
    ratio = macs / base
    ok = ratio <= TARGET + 0.02 and bool(out)
    return {"ok": ok, "achieved": ratio, **({} if ok else {"error": f"stopped at {ratio:.3f} of its MACs"})}


def _write(out: str, rows: list[dict], paths: list[str]) -> dict[str, int]:
    """Results so far, written atomically after every model (a long run that is stopped keeps them)."""
    import timm
    import torch
    import torch_pruning

    order = {name: k for k, (name, _, _) in enumerate(SAMPLE)}
    rows.sort(key=lambda r: order.get(r["model"], len(order)))  # redone models back in sample order
    summary = {p: sum(r[p]["ok"] for r in rows) for p in paths}
    exported = [r for r in rows if r.get("onnx", {}).get("stage") != "export"]
    doc = {
        "benchmark": "timm_coverage", "target_flops": TARGET, "models": len(rows), "success": summary,
        # the ONNX path over the models torch.onnx.export could export (its failures are not graphprune's)
        "onnx_success_of_exported": [sum(r["onnx"]["ok"] for r in exported), len(exported)] if "onnx" in paths else None,
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "torch_pruning": torch_pruning.__version__,
                     "python": platform.python_version()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(out + ".tmp", out)
    return summary


PATH_TITLES = {"torch": "graphprune PyTorch", "onnx": "graphprune ONNX", "torch_pruning": "Torch-Pruning"}


def _cell(c: dict) -> str:
    if c["ok"]:
        via = f" ({c['frontend']})" if c.get("frontend") == "torch.export" else ""
        return f"ok{via} {c['achieved']:.4f}"
    timeout = re.fullmatch(r"timeout after (\d+)s", c.get("error", ""))
    if timeout:
        return f"timeout ({timeout[1]}s wall clock, shared machine)"
    return "fail: " + c.get("error", "")[:70].replace("|", "/")


def markdown(doc: dict, paths: list[str] | None = None) -> str:
    """The per-model table of a results file: outcome and achieved FLOPs ratio per path (terminal and docs)."""
    from mdtable import md_table

    paths = paths or [p for p in PATH_TITLES if p in doc["success"]]
    titles = [PATH_TITLES.get(p, p) + (f" {doc['versions']['torch_pruning']}" if p == "torch_pruning" else "")
              for p in paths]
    return md_table(["model", "family", *titles],
                    [[r["model"], r["family"], *(_cell(r[p]) for p in paths)] for r in doc["rows"]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="subset of the sample (default: all)")
    ap.add_argument("--paths", nargs="*", default=["torch", "onnx", "torch_pruning"])
    ap.add_argument("--timeout", type=int, default=240, help="seconds per model and path")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, run the rest")
    ap.add_argument("--redo", nargs="*", default=[], help="with --resume: measure these models again")
    args = ap.parse_args()

    import torch
    import timm
    import torch_pruning

    torch.set_num_threads(2)
    signal.signal(signal.SIGALRM, _alarm)
    sample = [s for s in SAMPLE if not args.models or s[0] in args.models]
    rows = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            rows = [r for r in json.load(f)["rows"] if all(p in r for p in args.paths) and r["model"] not in args.redo]
    done = {r["model"] for r in rows}
    for k, (name, family, size) in enumerate(sample, 1):
        if name in done:
            continue
        row = {"model": name, "family": family, "input": [1, 3, size, size]}
        for path in args.paths:
            t0 = time.perf_counter()
            signal.alarm(args.timeout)
            try:
                torch.manual_seed(0)
                model = _build(timm, name, size)
                x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
                with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if path == "torch":
                        res = run_torch(model, x)
                    elif path == "onnx":
                        with tempfile.TemporaryDirectory() as tmp:
                            res = run_onnx(model, x, tmp)
                    else:
                        res = run_tp(model, x, model.get_classifier() if hasattr(model, "get_classifier") else None)
            except Timeout:
                res = {"ok": False, "error": f"timeout after {args.timeout}s"}
            except BaseException as exc:  # noqa: BLE001 - every failure is a data point
                if isinstance(exc, KeyboardInterrupt):
                    raise
                res = {"ok": False, "error": _first_line(exc)}
                if os.environ.get("TIMM_COVERAGE_DEBUG"):
                    traceback.print_exc()
            finally:
                signal.alarm(0)
            res["seconds"] = round(time.perf_counter() - t0, 1)
            row[path] = res
        rows.append(row)
        _write(args.out, rows, args.paths)
        print(f"[{k}/{len(sample)}] {name}: " + ", ".join(
            f"{p}={'ok' if row[p]['ok'] else 'FAIL (' + row[p].get('error', '')[:90] + ')'}" for p in args.paths),
            flush=True)

    summary = _write(args.out, rows, args.paths)
    print(f"\n{len(rows)} models, success: " + ", ".join(f"{p} {n}/{len(rows)}" for p, n in summary.items()))
    print()
    print(markdown(json.loads(Path(args.out).read_text()), args.paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
