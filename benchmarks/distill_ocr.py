"""Label-free distillation after pruning (issue 16): PP-OCRv4 rec at 0.5 / 0.4 FLOPs, the method ranking
at 0.5 under one distillation budget, and the digits ResNet-20 at 0.2 FLOPs without labels vs with labels.

    python benchmarks/distill_ocr.py ocr --target 0.5 --device cuda --budget-s 150 --out R.json
    python benchmarks/distill_ocr.py rank --methods l1,di --target 0.5 --device cuda --steps 2000 --out R.json
    python benchmarks/distill_ocr.py digits --device cuda --out R.json
    python benchmarks/distill_ocr.py report R1.json R2.json ...   # merged JSON + markdown tables
    benchmarks/device_distill.sh                                  # everything, both GPUs, one command

Data shared with benchmarks/ocr_accuracy.py (same renderer, fonts, preprocessing, CTC decoding and
character-accuracy metric; the same 256 calibration lines, seed 1000, and the same evaluation lines,
seed 2000). Distillation uses separate unlabeled training lines (seed 3000+, at most 5,000); labels
are only read to score. `ocr`: prune with act + lsq recovery (the best start, docs/recovery.md),
then `graphprune.finetune` from the original for a wall-time budget converted to steps after timing
a few steps, character accuracy of the evaluation lines on the GPU every `--eval-every` steps (the
curve), the final number through onnxruntime on the written ONNX model, and the CPU time of one
training step (`--cpu-threads` threads) for users without a GPU. `rank`: each method's plan at
0.5, the same lsq recovery and the same number of distillation steps.

Fonts: DejaVu from --fonts (a folder) or /usr/share/fonts; model from --models (a folder with
ch_PP-OCRv4_rec_infer.onnx) or the rapidocr wheel cache; missing ones: one line, exit 1.
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
REC_NAME = "ch_PP-OCRv4_rec_infer.onnx"
SHAPE = (1, 3, 48, 320)


def fail(msg: str, code: int = 1) -> None:
    print(f"distill_ocr: {msg}", file=sys.stderr)
    sys.exit(code)


def find_fonts(folder: str | None) -> list[str]:
    try:
        import PIL  # noqa: F401
    except ImportError:
        fail("Pillow is not installed (pip install pillow)")
    roots = [folder] if folder else ["/usr/share/fonts"]
    found = sorted(f for r in roots for f in glob.glob(os.path.join(r, "**", "DejaVu*.ttf"), recursive=True)
                   if "ExtraLight" not in f)
    if not found:
        fail(f"DejaVu fonts not found under {roots[0]} (carry a fonts folder and pass --fonts)")
    # the same list, in the same order, wherever the files live: the renderer picks fonts by index
    return sorted(found, key=os.path.basename)


def find_rec(models: str | None) -> Path:
    cands = [Path(models) / REC_NAME] if models else []
    cache = Path(os.environ.get("GRAPHPRUNE_CACHE", "/work/cache/wheels"))
    cands += [cache / "rapidocr-1.4.4-models" / REC_NAME, cache / REC_NAME]
    for c in cands:
        if c.is_file():
            return c
    fail(f"{REC_NAME} not found (looked in {', '.join(str(c.parent) for c in cands)}; pass --models DIR)")
    raise AssertionError


def _render_chunk(args: tuple[int, int, list[str]]) -> np.ndarray:
    from ocr_accuracy import make_lines

    n, seed, fonts = args
    return make_lines(n, seed=seed, fonts=fonts)[0]


def render_train(n: int, fonts: list[str], workers: int) -> np.ndarray:
    """n unlabeled training lines in chunks of 250 (seeds 3000, 3001, ...), rendered in parallel."""
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(min(250, n - i), 3000 + k, fonts) for k, i in enumerate(range(0, n, 250))]
    if workers <= 1:
        return np.concatenate([_render_chunk(c) for c in chunks])
    with ProcessPoolExecutor(workers) as ex:
        return np.concatenate(list(ex.map(_render_chunk, chunks)))


class Scorer:
    """Character accuracy (ocr_accuracy's metric) of a torch module or an ONNX model on the evaluation lines."""

    def __init__(self, ev: np.ndarray, labels: list[str], charset: list[str], device: str) -> None:
        self.ev, self.labels, self.charset, self.device = ev, labels, charset, device

    def module(self, model) -> dict[str, float]:
        import torch

        from ocr_accuracy import ctc_decode, text_scores

        dev = next(model.parameters()).device
        probs = []
        with torch.no_grad():
            for i in range(0, len(self.ev), 100):
                x = torch.from_numpy(self.ev[i:i + 100]).to(dev)
                probs.append(model(x)[0].float().cpu().numpy())
        return text_scores(ctc_decode(np.concatenate(probs), self.charset), self.labels)

    def onnx(self, model, threads: int = 4) -> dict[str, float]:
        from ocr_accuracy import ctc_decode, run_batches, session, text_scores

        return text_scores(ctc_decode(run_batches(session(model, threads), self.ev), self.charset), self.labels)


def prepare(a) -> dict:
    from ocr_accuracy import charset_of, make_lines

    fonts = find_fonts(a.fonts)
    rec = find_rec(a.models)
    t = time.perf_counter()
    calib, _ = make_lines(256, seed=1000, fonts=fonts)
    ev, labels = make_lines(a.eval_lines, seed=2000, fonts=fonts)
    train = render_train(a.train_lines, fonts, a.workers)
    render_s = time.perf_counter() - t
    print(f"[{a.tag}] rendered 256 calib + {len(ev)} eval + {len(train)} training lines in {render_s:.1f}s", flush=True)
    scorer = Scorer(ev, labels, charset_of(rec), a.device)
    t = time.perf_counter()
    base = scorer.onnx(str(rec), a.ort_threads)
    print(f"[{a.tag}] original: char {100 * base['char_acc']:.2f}% ({time.perf_counter() - t:.0f}s)", flush=True)
    return {"rec": rec, "calib": calib, "train": train, "scorer": scorer, "base": base, "render_s": render_s,
            "fonts": len(fonts)}


def prune_rec(rec: Path, target: float, method: str, calib: np.ndarray, recover: str = "lsq") -> tuple:
    import graphprune

    kw: dict = {"method": method, "calib": calib, "recover": recover}
    if method == "di":
        kw["calib"] = (calib, di_labels(rec, calib))
    t = time.perf_counter()
    cpu = time.process_time()
    res = graphprune.prune(str(rec), input_shape={"x": SHAPE}, target_flops=target, **kw)
    return res, {"prune_s": time.perf_counter() - t, "prune_cpu_s": time.process_time() - cpu,
                 "flops": res.plan.achieved}


def di_labels(rec: Path, calib: np.ndarray) -> np.ndarray:
    """DI needs classes: the original's first decoded character per line (benchmarks/di_ppocr.py's
    pseudo-labels; still no ground truth), blank class 0 for lines that decode to nothing."""
    from ocr_accuracy import run_batches, session

    probs = run_batches(session(str(rec), 4), calib)
    out = []
    for ids in probs.argmax(-1):
        keep = np.ones(len(ids), bool)
        keep[1:] = ids[1:] != ids[:-1]
        chars = [int(i) for i in ids[keep] if i != 0]
        out.append(chars[0] if chars else 0)
    return np.asarray(out, np.int64)


TRAINING_METHODS = ("hfp", "ssr", "hbfp")


def train_then_prune(rec: Path, target: float, method: str, prep: dict, a) -> tuple:
    """A training-based method on the ONNX model, driven by distillation from the original on the same
    unlabeled lines (graphprune.distill_methods); its steps count against the ranking's step budget.
    Then the usual pipeline cuts its plan from the method's trained weights, with the same recovery."""
    import graphprune
    from graphprune.distill_methods import train_plan

    t = time.perf_counter()
    cpu = time.process_time()
    tp = train_plan(str(rec), prep["train"], method, target, input_shape={"x": SHAPE}, steps=a.method_steps,
                    epoch_steps=a.epoch_steps, batch_size=a.batch_size, lr=a.lr, device=a.device, seed=0,
                    progress=lambda msg: print(f"[{a.tag}:{method}] {msg}", flush=True))
    res = graphprune.prune(tp.model, input_shape={"x": SHAPE}, removed=tp.removed, calib=prep["calib"],
                           recover=a.recover)
    return res, {"prune_s": time.perf_counter() - t, "prune_cpu_s": time.process_time() - cpu,
                 "flops": res.plan.achieved, "method_steps": tp.steps, "method_train_s": tp.train_s,
                 "method_log": {k: v[-3:] if isinstance(v, list) else v for k, v in tp.log.items()}}


def _step_setup(rec: Path, slim, dev) -> tuple:
    """Teacher and student ONNX modules on `dev`, the logits tensor both tap, and an optimiser."""
    import torch

    from graphprune.frontends.onnx_frontend import load_onnx
    from graphprune.frontends.onnx_torch import OnnxModule

    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    t_m = OnnxModule(load_onnx(str(rec), {"x": SHAPE}).proto).to(dev, memory_format=fmt).eval()
    s_m = OnnxModule(load_onnx(slim, {"x": SHAPE}).proto).to(dev, memory_format=fmt)
    logits = next(node.input[0] for node, _ in reversed(t_m._nodes) if node.op_type == "Softmax")
    t_m.taps = s_m.taps = {logits}
    return t_m, s_m, logits, torch.optim.AdamW(s_m.parameters(), lr=1e-5)


def _timed_steps(setup: tuple, x, steps: int) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds of `steps` training steps (after one untimed step)."""
    import torch

    from graphprune.distill import kl_logits

    t_m, s_m, logits, opt = setup
    cuda = x.device.type == "cuda"
    walls, cpus = [], []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cuda):
            with torch.no_grad():
                t_m(x)
            s_m(x)
            loss = kl_logits(s_m.captured[logits], t_m.captured[logits], 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    return walls, cpus


def steps_for_budget(rec: Path, slim, train: np.ndarray, a) -> tuple[int, float]:
    """Time a few real training steps (teacher forward + student forward/backward + AdamW) and turn the
    wall budget into a step count, so the cosine schedule ends when the budget does."""
    import torch

    dev = torch.device(a.device)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    x = torch.from_numpy(train[: a.batch_size]).to(dev).contiguous(memory_format=fmt)
    walls, _ = _timed_steps(_step_setup(rec, slim, dev), x, a.timing_steps)
    step_s = float(np.median(walls))
    overhead = 1.15  # evaluations and data movement on top of the bare step
    return max(10, int(a.budget_s / (step_s * overhead))), step_s


def cpu_step_time(rec: Path, slim, train: np.ndarray, threads: int, batch: int, steps: int = 3) -> dict:
    """Seconds per distillation step on the CPU (fp32, `threads` torch threads), wall and process CPU."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        walls, cpus = _timed_steps(_step_setup(rec, slim, torch.device("cpu")), torch.from_numpy(train[:batch]), steps)
    finally:
        torch.set_num_threads(old)
    return {"threads": threads, "batch": batch, "wall_s_per_step": float(np.median(walls)),
            "cpu_s_per_step": float(np.median(cpus)), "steps_timed": steps}


def distil(rec: Path, slim, prep: dict, steps: int, a, tag: str) -> dict:
    import graphprune

    scorer = prep["scorer"]
    base = prep["base"]["char_acc"]
    eval_every = max(1, steps // a.curve_points)

    def monitor(step: int, student) -> dict:
        s = scorer.module(student)
        print(f"[{tag}] step {step:5d}: char {100 * s['char_acc']:.2f}% (rel {100 * s['char_acc'] / base:.2f}%)",
              flush=True)
        return {"char_acc": s["char_acc"], "rel_char_acc": s["char_acc"] / base, "line_acc": s["line_acc"]}

    t = time.perf_counter()
    res = graphprune.finetune(str(rec), slim, prep["train"], input_shape={"x": SHAPE}, steps=steps,
                              batch_size=a.batch_size, lr=a.lr, eval_every=eval_every, patience=0,
                              device=a.device, seed=0, bar=False, monitor=monitor)
    wall = time.perf_counter() - t
    final = scorer.onnx(res.model, a.ort_threads)
    rep = {k: v for k, v in res.report.items() if k not in ("agreement_before", "agreement_after")}
    rep["agreement_before"] = res.report["agreement_before"]["outputs"]
    rep["agreement_after"] = res.report["agreement_after"]["outputs"]
    return {"model": res.model, "finetune": rep, "finetune_wall_s": wall, "final": final,
            "final_rel": final["char_acc"] / base}


def cmd_ocr(a) -> dict:
    prep = prepare(a)
    rec = prep["rec"]
    res, pr = prune_rec(rec, a.target, "act", prep["calib"], a.recover)
    slim = res.model
    start = prep["scorer"].onnx(slim, a.ort_threads)
    print(f"[{a.tag}] act+lsq at {a.target}: FLOPs {pr['flops']:.3f}, char {100 * start['char_acc']:.2f}% "
          f"(prune {pr['prune_s']:.0f}s)", flush=True)
    steps, step_s = (a.steps, None) if a.steps else steps_for_budget(rec, slim, prep["train"], a)
    print(f"[{a.tag}] distilling {steps} steps (timed {step_s if step_s else float('nan'):.4f} s/step)", flush=True)
    out = distil(rec, slim, prep, steps, a, a.tag)
    print(f"[{a.tag}] after: char {100 * out['final']['char_acc']:.2f}% = {100 * out['final_rel']:.2f}% of the original "
          f"({out['finetune_wall_s']:.0f}s)", flush=True)
    cpu = cpu_step_time(rec, slim, prep["train"], a.cpu_threads, a.batch_size, a.cpu_steps) if a.cpu_steps else None
    if cpu:
        print(f"[{a.tag}] CPU: {cpu['wall_s_per_step']:.2f} s/step wall, {cpu['cpu_s_per_step']:.2f} s CPU "
              f"({a.cpu_threads} threads, batch {a.batch_size})", flush=True)
    if a.save_model:
        import onnx

        onnx.save(out["model"], a.save_model)
    return {"kind": "ocr", "target": a.target, "pipeline": "act + lsq, then distillation",
            "original": prep["base"], "pruned": {**pr, **start, "rel_char_acc": start["char_acc"] / prep["base"]["char_acc"]},
            "train_lines": len(prep["train"]), "eval_lines": len(prep["scorer"].ev), "render_s": prep["render_s"],
            "budget_s": a.budget_s, "timed_step_s": step_s, "steps": steps, "finetune": out["finetune"],
            "finetune_wall_s": out["finetune_wall_s"], "final": out["final"], "final_rel": out["final_rel"],
            "cpu_step": cpu, "device": device_name(a.device)}


def cmd_rank(a) -> dict:
    prep = prepare(a)
    rec = prep["rec"]
    rows = []
    for method in a.methods.split(","):
        row: dict = {"method": method}
        try:
            method_steps = 0
            if method in TRAINING_METHODS:
                res, pr = train_then_prune(rec, a.target, method, prep, a)
                method_steps = pr["method_steps"]
            else:
                res, pr = prune_rec(rec, a.target, method, prep["calib"], a.recover)
            start = prep["scorer"].onnx(res.model, a.ort_threads)
            row.update(pr, start_char_acc=start["char_acc"], start_rel=start["char_acc"] / prep["base"]["char_acc"],
                       method_steps=method_steps)
            print(f"[{a.tag}] {method}: FLOPs {pr['flops']:.4f}, after {a.recover}: char {100 * row['start_rel']:.2f}% "
                  f"of the original; distilling {a.steps - method_steps} steps", flush=True)
            out = distil(rec, res.model, prep, a.steps - method_steps, a, f"{a.tag}:{method}")
            row.update(final=out["final"], final_rel=out["final_rel"], finetune_wall_s=out["finetune_wall_s"],
                       curve=out["finetune"]["curve"], steps=out["finetune"]["steps"])
            print(f"[{a.tag}] {method}: start {100 * row['start_rel']:.2f}% -> {100 * row['final_rel']:.2f}% of the original",
                  flush=True)
        except NotImplementedError as exc:
            row["unavailable"] = str(exc)
            print(f"[{a.tag}] {method}: unavailable ({exc})", flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' rows
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"[{a.tag}] {method}: error {row['error']}", flush=True)
        rows.append(row)
    return {"kind": "rank", "target": a.target, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
            "recovery": a.recover, "original": prep["base"], "rows": rows, "device": device_name(a.device)}


def cmd_digits(a) -> dict:
    """ResNet-20 on digits (benchmarks/accuracy.py's setup): L1 plan at `--digits-target`, fine-tuned with
    labels (accuracy.py's run_method, its epoch budget) vs distilled from the unpruned model without labels
    for the same number of steps, per seed."""
    import torch

    import accuracy
    import graphprune
    from digits import load_digits_split

    from graphprune.passes.training import evaluate

    q = a.digits_quick  # a local smoke test of the procedure, not a result
    ns = argparse.Namespace(device=a.device, no_progress=True, kd=0.0, lr=0.05, ft_epochs=1 if q else 12,
                            method_epochs=1 if q else 8, calib=128 if q else 512)
    tr, te = load_digits_split(12 if q else 32)
    rows = []
    for seed in a.seeds:
        base, space, history = accuracy.train_base(tr, seed, 3 if q else 40, 0.1, a.device)
        base.eval()
        base_acc = evaluate(base, te.x, te.y, a.device)
        t = time.perf_counter()
        lab = accuracy.run_method("l1", base, space, history, tr, a.digits_target, ns, seed)
        lab_acc = evaluate(lab["model"], te.x, te.y, a.device)
        lab_s = time.perf_counter() - t
        epochs = ns.ft_epochs + ns.method_epochs
        steps = epochs * ((len(tr.y) + 127) // 128)
        slim = graphprune.prune(copy.deepcopy(base).cpu(), tr.x[:1], removed=set(lab["removed"])).model
        slim_acc = evaluate(slim, te.x, te.y, a.device)
        t = time.perf_counter()
        res = graphprune.finetune(copy.deepcopy(base).cpu(), slim, tr.x.numpy(), steps=steps, batch_size=128,
                                  lr=0.05, optimizer="sgd", weight_decay=5e-4, temperature=a.digits_temperature,
                                  eval_every=0, device=a.device, seed=seed, bar=False, augment="shift",
                                  train_bn=True, grad_clip=None)  # as the labelled loop: BN trains, no clipping
        kd_s = time.perf_counter() - t
        kd_acc = evaluate(res.model, te.x, te.y, a.device)
        ranking = {}
        for method in a.digits_methods.split(","):
            ns_free = argparse.Namespace(**{**vars(ns), "label_free": True})
            r = accuracy.run_method(method, base, space, history, tr, a.digits_target, ns_free, seed)
            ranking[method] = {"acc": evaluate(r["model"], te.x, te.y, a.device), "flops": r["macs"],
                               "time_s": r["time_s"]}
        row = {"seed": seed, "base_acc": base_acc, "flops": lab["macs"], "pruned_acc": slim_acc, "label_free_methods": ranking,
               "labelled_ft_acc": lab_acc, "labelled_epochs": epochs, "labelled_s": lab_s,
               "distilled_acc": kd_acc, "distill_steps": steps, "distill_s": kd_s,
               "agreement_after": res.report["score_after"]}
        print(f"[digits] seed {seed}: base {100 * base_acc:.2f}%, l1 {a.digits_target} pruned {100 * slim_acc:.2f}%, "
              f"labelled FT {100 * lab_acc:.2f}%, label-free distillation {100 * kd_acc:.2f}%", flush=True)
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("base_acc", "pruned_acc", "labelled_ft_acc", "distilled_acc")}
    methods = list(rows[0]["label_free_methods"]) if rows else []
    mean["label_free_methods"] = {m: float(np.mean([r["label_free_methods"][m]["acc"] for r in rows])) for m in methods}
    return {"kind": "digits", "quick": q, "target": a.digits_target, "method": "l1", "seeds": a.seeds, "rows": rows, "mean": mean,
            "gap_points": 100 * (mean["labelled_ft_acc"] - mean["distilled_acc"]), "device": device_name(a.device),
            "temperature": a.digits_temperature}


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


# -- report ----------------------------------------------------------------------------------------
def markdown(parts: list[dict]) -> str:
    lines = []
    ocr = sorted((p for p in parts if p.get("kind") == "ocr"), key=lambda p: -p["target"])
    if ocr:
        o = ocr[0]["original"]
        lines += [f"PP-OCRv4 rec, {ocr[0]['eval_lines']} rendered evaluation lines, original char accuracy "
                  f"{100 * o['char_acc']:.2f}%; act + lsq recovery, then label-free distillation on "
                  f"{ocr[0]['train_lines']} unlabeled rendered lines ({ocr[0]['device']}).", "",
                  "| FLOPs kept | act + lsq | + distillation | steps | distillation wall | held-out top-1 agreement "
                  "| CPU per step |",
                  "|---|---|---|---|---|---|---|"]
        for p in ocr:
            cpu = p.get("cpu_step")
            cpu_s = f"{cpu['wall_s_per_step']:.2f} s ({cpu['threads']} threads, batch {cpu['batch']})" if cpu else "-"
            ft = p["finetune"]
            agree = " -> ".join(f"{100 * a[0]['top1_agreement']:.2f}%" for a in (ft["agreement_before"], ft["agreement_after"]))
            lines.append(f"| {p['target']:g} | {100 * p['pruned']['rel_char_acc']:.2f}% | {100 * p['final_rel']:.2f}% | "
                         f"{p['steps']} | {p['finetune_wall_s']:.0f} s | {agree} | {cpu_s} |")
        lines += ["", "Character accuracy relative to the original vs distillation steps (evaluated with the training module):", ""]
        for p in ocr:
            pts = ", ".join(f"{c['step']}: {100 * c['rel_char_acc']:.1f}%" for c in p["finetune"]["curve"] if "rel_char_acc" in c)
            lines.append(f"- {p['target']:g}: {pts}")
        lines.append("")
    rank = [p for p in parts if p.get("kind") == "rank"]
    if rank:
        rows = [r for p in rank for r in p["rows"]]
        # one row per method: its measurement if any file has one (an older file may list it as
        # unavailable), else its latest failure
        last = {r["method"]: r for r in rows}
        measured = {r["method"]: r for r in rows if "final_rel" in r}
        rows = [measured.get(m, r) for m, r in last.items()]
        r0 = rank[0]
        lines += [f"Method ranking at {r0['target']:g} FLOPs: each method's plan, {r0.get('recovery', 'lsq')} recovery, "
                  "then distillation "
                  f"(batch {r0['batch_size']}); every method gets {r0['steps']} steps of the distillation loss in all: "
                  "HFP, SSR and HBFP spend the first ones training the unpruned model towards their plan "
                  "(gates / group sparsity / norm pairs, no labels), the rest distil the pruned model. "
                  "Char accuracy relative to the original.", "",
                  "| method | FLOPs | steps: method + distillation | after recovery | after distillation |",
                  "|---|---|---|---|---|"]
        ranked = sorted((r for r in rows if "final_rel" in r), key=lambda r: -r["final_rel"])
        for r in ranked:
            lines.append(f"| {r['method']} | {r['flops']:.3f} | {r.get('method_steps', 0)} + {r['steps']} | "
                         f"{100 * r['start_rel']:.2f}% | {100 * r['final_rel']:.2f}% |")
        why: dict[str, list[str]] = {}  # methods that did not run, one row per reason
        for r in rows:
            if "final_rel" in r:
                continue
            if r.get("unavailable") and r["method"] in TRAINING_METHODS:
                reason = "no result yet (listed by a run older than their ONNX wiring)"
            elif r.get("unavailable"):
                reason = f"not run: {r.get('unavailable')}"
            else:
                reason = f"failed: {r.get('error')}"
            why.setdefault(reason, []).append(r["method"])
        lines += [f"| {', '.join(methods)} | - | - | - | {reason} |" for reason, methods in why.items()]
        lines.append("")
    dig = [p for p in parts if p.get("kind") == "digits"]
    for d in dig:
        m = d["mean"]
        lines += [f"ResNet-20 on digits, L1 at {d['target']:g} FLOPs, mean of seeds {d['seeds']}:", "",
                  "| unpruned | pruned | labelled fine-tuning | label-free distillation | gap |", "|---|---|---|---|---|",
                  f"| {100 * m['base_acc']:.2f}% | {100 * m['pruned_acc']:.2f}% | {100 * m['labelled_ft_acc']:.2f}% | "
                  f"{100 * m['distilled_acc']:.2f}% | {d['gap_points']:+.2f} points |", ""]
        if m.get("label_free_methods"):
            lines += [f"Label-free ranking on digits at {d['target']:g} FLOPs (accuracy.py's procedure and epoch budget "
                      "per method; every loss is distillation from the unpruned model, DI's classes are its predictions):",
                      "", "| method | accuracy |", "|---|---|"]
            for meth, acc in sorted(m["label_free_methods"].items(), key=lambda kv: -kv[1]):
                lines.append(f"| {meth} | {100 * acc:.2f}% |")
            lines.append("")
    return "\n".join(lines)


def cmd_report(a) -> None:
    parts = []
    for f in a.files:
        try:
            parts.append(json.loads(Path(f).read_text()))
        except (OSError, ValueError) as exc:
            print(f"distill_ocr: skipping {f}: {exc}", file=sys.stderr)
    md = markdown(parts)
    print(md)
    if a.out:
        Path(a.out).write_text(json.dumps({"parts": parts}, indent=1, default=float))
    if a.md:
        Path(a.md).write_text(md + "\n")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cmd", choices=["ocr", "rank", "digits", "report"])
    p.add_argument("files", nargs="*", help="report: result files to merge")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--methods", default="l1,di,hfp,ssr,hbfp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-s", type=float, default=150.0, help="ocr: distillation wall budget (converted to steps)")
    p.add_argument("--steps", type=int, help="distillation steps (rank: required; ocr: overrides --budget-s)")
    p.add_argument("--method-steps", type=int, default=400,
                   help="rank: steps HFP/SSR/HBFP train (distillation loss) before pruning, out of --steps")
    p.add_argument("--epoch-steps", type=int, default=40, help="rank: steps per epoch of the training-based methods")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--curve-points", type=int, default=8)
    p.add_argument("--train-lines", type=int, default=5000)
    p.add_argument("--eval-lines", type=int, default=500)
    p.add_argument("--workers", type=int, default=8, help="processes rendering the training lines")
    p.add_argument("--ort-threads", type=int, default=4)
    p.add_argument("--cpu-threads", type=int, default=8, help="torch threads for the CPU step timing")
    p.add_argument("--cpu-steps", type=int, default=3, help="CPU steps to time (0: skip)")
    p.add_argument("--fonts", help="folder with the DejaVu .ttf files")
    p.add_argument("--models", help=f"folder with {REC_NAME}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--digits-target", type=float, default=0.2)
    p.add_argument("--digits-temperature", type=float, default=4.0)
    p.add_argument("--digits-quick", action="store_true", help="tiny CPU smoke test (12x12, 3 base epochs)")
    p.add_argument("--digits-methods", default="l1,di,hfp,ssr,hbfp",
                   help="label-free ranking on digits (accuracy.py's procedures, distillation instead of labels)")
    p.add_argument("--save-model", help="ocr: also write the distilled ONNX model here")
    p.add_argument("--recover", default="lsq", help="recovery before distillation (lsq; bias for quick local checks)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", help="result JSON (report: merged JSON)")
    p.add_argument("--md", help="report: markdown tables")
    a = p.parse_args()
    a.tag = a.tag or (f"{a.cmd} {a.target:g}" if a.cmd in ("ocr", "rank") else a.cmd)
    if a.cmd == "rank" and not a.steps:
        p.error("rank needs --steps (the same budget for every method)")
    if a.cmd == "rank" and set(a.methods.split(",")) & set(TRAINING_METHODS) and a.method_steps >= a.steps:
        p.error("--method-steps must leave distillation steps out of --steps")
    if a.train_lines > 5000:
        p.error("the issue's budget is at most 5,000 training lines")
    return a


def main() -> None:
    a = parse()
    if a.cmd == "report":
        cmd_report(a)
        return
    if a.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA device is available")
    t = time.perf_counter()
    res = {"ocr": cmd_ocr, "rank": cmd_rank, "digits": cmd_digits}[a.cmd](a)
    res["total_s"] = time.perf_counter() - t
    res["args"] = {k: v for k, v in vars(a).items() if k != "files"}
    text = json.dumps(res, indent=1, default=float)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(a.out).with_suffix(".part")
        tmp.write_text(text)
        tmp.replace(a.out)
    print(f"[{a.tag}] done in {res['total_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
