"""Accuracy that survives pruning without training: PP-OCRv4 text recognition (a real pretrained model
nobody here trained) and a ResNet-20 trained here on digits, pruned to FLOPs targets with and without
calibration-driven recovery.

    python benchmarks/ocr_accuracy.py            # full table (PP-OCR + direction classifier + digits)
    python benchmarks/ocr_accuracy.py --quick    # fewer targets/lines, a few minutes on 2 cores

The model comes from the `rapidocr-onnxruntime==1.4.4` wheel, fetched with pip into a cache
(`--cache`, default /work/cache/wheels or $GRAPHPRUNE_CACHE); offline and not cached: one line, exit 1.
Text lines are rendered here with Pillow and the DejaVu fonts from fixed seeds: 256 unlabeled
calibration lines and a separate labeled evaluation set (default 500). Character accuracy is
1 - (sum of edit distances) / (sum of label lengths), spaces ignored (the original's errors are almost
all word gaps it merges or adds on tightly kerned synthetic text); line accuracy counts exact reads. Accuracy
"relative" is the pruned model's character accuracy divided by the original's.

Rows are cumulative pipelines, so each pass's contribution is the difference between two rows:
weight criterion -> activation-aware importance -> + bias compensation -> + least-squares
reconstruction -> + sensitivity-aware allocation. A row whose option the installed graphprune does
not have yet is listed as unavailable rather than silently run without it.
Writes benchmarks/results/ocr_accuracy[_quick].json and the tables in docs/accuracy.md.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHEEL = "rapidocr-onnxruntime==1.4.4"
WHEEL_FILE = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
REC = "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"
CLS = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
REC_SHAPE = (1, 3, 48, 320)
CLS_SHAPE = (1, 3, 48, 192)
TARGETS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5]
ROOT = Path(__file__).resolve().parent.parent

WORDS = """the of and to in is was for on are with as his they be at one have this from or had by word but
what some we can out other were all there when up use your how said an each she which do their time if will
way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any
new work part take get place made live where after back little only round man year came show every good me
give our under name very through just form sentence great think say help low line differ turn cause much mean
before move right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never last
let thought city tree cross farm hard start might story saw far sea draw left late run while press close night
real life few north open seem together next white children begin got walk example ease paper group always
music those both mark often letter until mile river car feet care second book carry took science eat room
friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table travel less morning ten simple
several vowel toward war lay against pattern slow center love person money serve appear road map rain rule
govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure
star box noun field rest correct able pound done beauty drive stood contain front teach week final gave green
quick develop ocean warm free minute strong special mind behind clear tail produce fact street inch multiply
nothing course stay wheel full force blue object decide surface deep moon island foot system busy test record
boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought
heat snow tire bring yes distant fill east paint language among""".split()


# -- data -------------------------------------------------------------------------------------------
def fail(msg: str, code: int = 1) -> None:
    print(f"ocr_accuracy: {msg}", file=sys.stderr)
    sys.exit(code)


def fetch_models(cache: Path) -> dict[str, Path]:
    """The wheel from the cache or pip, and the two ONNX files unzipped next to it."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL_FILE
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not wheel.exists():
            last = (r.stderr.strip().splitlines() or ["pip download failed"])[-1]
            fail(f"cannot fetch {WHEEL} (offline? put {WHEEL_FILE} into {cache}): {last[:160]}")
    out_dir = cache / "rapidocr-1.4.4-models"
    out_dir.mkdir(exist_ok=True)
    paths = {}
    with zipfile.ZipFile(wheel) as z:
        for key, member in (("rec", REC), ("cls", CLS)):
            dest = out_dir / os.path.basename(member)
            if not dest.exists():
                tmp = dest.with_suffix(".part")
                tmp.write_bytes(z.read(member))
                tmp.replace(dest)
            paths[key] = dest
    return paths


def dejavu_fonts() -> list[str]:
    found = sorted(glob.glob("/usr/share/fonts/**/DejaVu*.ttf", recursive=True))
    found = [f for f in found if "ExtraLight" not in f]
    if not found:
        fail("DejaVu fonts not found under /usr/share/fonts (apt-get install fonts-dejavu-core)")
    return found


def random_text(rng: np.random.Generator) -> str:
    """Words and numbers: 1-3 tokens, some capitalised, some with punctuation."""
    tokens = []
    for _ in range(rng.integers(1, 4)):
        kind = rng.random()
        if kind < 0.55:
            w = WORDS[rng.integers(len(WORDS))]
            r = rng.random()
            w = w.capitalize() if r < 0.25 else (w.upper() if r < 0.35 else w)
        elif kind < 0.75:
            w = str(rng.integers(0, 10 ** rng.integers(1, 6)))
        elif kind < 0.85:
            w = f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
        elif kind < 0.93:
            w = f"{rng.integers(1, 29):02d}-{rng.integers(1, 13):02d}-{rng.integers(1990, 2030)}"
        else:
            w = WORDS[rng.integers(len(WORDS))] + "," if rng.random() < 0.5 else "$" + str(rng.integers(1, 999))
        tokens.append(w)
    return " ".join(tokens)


def render_line(text: str, rng: np.random.Generator, fonts: list[str]):
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(26, 41)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 16)), int(rng.integers(3, 10))
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg = int(rng.integers(200, 256))
    fg = int(rng.integers(0, 70))
    img = Image.new("L", (w, h), bg)
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, fill=fg, font=font)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.9))))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, 8), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def preprocess(gray: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """PP-OCR rec input: resize to `height` keeping aspect, scale to [-1, 1], right-pad with zeros."""
    from PIL import Image

    h, w = gray.shape
    new_w = int(np.ceil(height * w / h))
    if new_w > width:
        return None
    img = np.asarray(Image.fromarray(gray).convert("RGB").resize((new_w, height), Image.BILINEAR), np.float32)
    x = (img / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = x.transpose(2, 0, 1)
    return out


def make_lines(n: int, seed: int, fonts: list[str], height: int = 48, width: int = 320,
               turned: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """n preprocessed lines and their texts; lines flagged in `turned` are rotated by 180 degrees first."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    while len(xs) < n:
        text = random_text(rng)
        gray = render_line(text, rng, fonts)
        if turned is not None and turned[len(xs)]:
            gray = np.ascontiguousarray(gray[::-1, ::-1])
        x = preprocess(gray, height, width)
        if x is not None:  # too wide for the static input width: draw another
            xs.append(x)
            texts.append(text)
    return np.stack(xs), texts


# -- evaluation -----------------------------------------------------------------------------------
def session(model, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run_batches(sess, x: np.ndarray) -> np.ndarray:
    """The models are pinned to batch 1: feed one sample at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    out = []
    for ids in probs.argmax(-1):
        keep = np.ones(len(ids), bool)
        keep[1:] = ids[1:] != ids[:-1]
        out.append("".join(charset[i] for i in ids[keep] if i != 0))
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_scores(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Scored without spaces: the model's word gaps on tight synthetic kerning are not what pruning changes."""
    preds = ["".join(p.split()) for p in preds]
    labels = ["".join(t.split()) for t in labels]
    errors = sum(edit_distance(p, t) for p, t in zip(preds, labels))
    chars = sum(len(t) for t in labels)
    return {"char_acc": max(0.0, 1 - errors / chars), "line_acc": float(np.mean([p == t for p, t in zip(preds, labels)]))}


def charset_of(path: Path) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


# -- configurations ------------------------------------------------------------------------------
@dataclass
class Config:
    """One cumulative pipeline: a row of the table."""

    label: str
    method: str
    recover: str | None = None  # None: no recovery option passed
    strategy: str = "global"
    needs: tuple[str, ...] = ()  # prune() options / methods / strategies this row depends on

    def kwargs(self, calib, supported: set[str]) -> dict:
        kw: dict = {"method": self.method, "strategy": self.strategy}
        if self.recover is not None or self.strategy == "sensitivity" or "method:" + self.method in self.needs:
            kw["calib"] = calib
            if "recover" in supported:  # explicit, so a default recovery never sneaks into a row
                kw["recover"] = self.recover or "none"
        return kw


ACT = os.environ.get("OCR_BENCH_ACT_METHOD", "act")  # the activation-aware criterion's name


def configs(quick: bool, only: list[str] | None = None) -> list[Config]:
    rows = _all_configs(quick)
    return [r for r in rows if r.label in only] if only else rows


def _all_configs(quick: bool) -> list[Config]:
    sens = "strategy:sensitivity"
    act = "method:" + ACT
    rows = [Config(m, m) for m in (["l1"] if quick else ["l1", "fpgm", "bn_scale"])]
    rows.append(Config("l1 + sensitivity", "l1", None, "sensitivity", needs=(sens,)))
    if not quick:
        rows += [Config("l1 + bias", "l1", "bias", needs=("recover",)),
                 Config("l1 + lsq", "l1", "lsq", needs=("recover",)),
                 Config(ACT, ACT, "none", needs=("recover", act)),
                 Config(f"{ACT} + bias", ACT, "bias", needs=("recover", act))]
    rows += [Config(f"{ACT} + lsq", ACT, "lsq", needs=("recover", act)),
             Config(f"{ACT} + lsq + sensitivity", ACT, "lsq", "sensitivity", needs=("recover", act, sens))]
    return rows


def available(cfg: Config) -> str | None:
    """None if the installed graphprune supports the row, else why not."""
    import graphprune
    from graphprune.passes import allocate
    from graphprune.passes.magnitude import CRITERIA

    params = inspect.signature(graphprune.prune).parameters
    for need in cfg.needs:
        kind, _, value = need.partition(":")
        if kind == "recover" and "recover" not in params:
            return "prune() has no recover option yet"
        if kind == "method":
            from graphprune import api

            known = set(CRITERIA) | set(getattr(api, "ACT_METHODS", ()))
            if value not in known:
                return f"no method {value!r} yet"
        if kind == "strategy" and value not in getattr(allocate, "STRATEGIES", ("global", "uniform")):
            return f"no strategy {value!r} yet"
    return None


ROUND_TO: str = "1"  # set from --round-to in main()


def prune_one(path: Path, shape: tuple[int, ...], target: float, cfg: Config, calib: np.ndarray) -> dict:
    import graphprune

    t = time.perf_counter()
    supported = set(inspect.signature(graphprune.prune).parameters)
    extra: dict = {}
    if "round_to" in supported:
        extra["round_to"] = ROUND_TO if ROUND_TO == "auto" else int(ROUND_TO)
    if "measure" in supported:
        extra["measure"] = False  # latency is not what this table is about; keeps prune times comparable
    result = graphprune.prune(str(path), input_shape={"x": shape}, target_flops=target,
                              **cfg.kwargs(calib, supported), **extra)
    wall = time.perf_counter() - t
    times = result.report.get("time", {})
    recovery = {k: v for k, v in times.items() if k not in ("load_s", "analyze_s", "rewrite_s", "validate_s", "total_s")}
    kept = {g.id: result.plan.kept.get(g.id) for g in result.analysis.prunable_groups}
    return {"model": result.model, "flops": result.plan.achieved, "prune_s": wall, "times": times,
            "data_s": sum(recovery.values()), "kept": kept}


# -- PP-OCR rec ------------------------------------------------------------------------------------
def ocr_table(a, paths, fonts) -> dict:
    charset = charset_of(paths["rec"])
    t = time.perf_counter()
    calib, _ = make_lines(a.calib, seed=1000, fonts=fonts)
    ev, labels = make_lines(a.lines, seed=2000, fonts=fonts)
    print(f"rendered {len(calib)} calibration + {len(ev)} evaluation lines in {time.perf_counter() - t:.1f}s")
    base = text_scores(ctc_decode(run_batches(session(str(paths["rec"]), a.threads), ev), charset), labels)
    print(f"original PP-OCRv4 rec: char {100 * base['char_acc']:.2f}%  line {100 * base['line_acc']:.2f}%")
    rows = []
    for cfg in configs(a.quick, a.rows):
        why = available(cfg)
        if why:
            print(f"  {cfg.label:34s} unavailable: {why}")
            rows.append({"config": cfg.label, "unavailable": why})
            continue
        for target in a.targets:
            row = {"config": cfg.label, "method": cfg.method, "recover": cfg.recover, "strategy": cfg.strategy,
                   "target": target}
            try:
                r = prune_one(paths["rec"], REC_SHAPE, target, cfg, calib)
            except Exception as exc:  # a failing row is a result, not a crash of the whole table
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"  {cfg.label:34s} T={target:.2f} error {row['error']}")
                rows.append(row)
                continue
            s = text_scores(ctc_decode(run_batches(session(r.pop("model"), a.threads), ev), charset), labels)
            row.update(s, flops=r["flops"], prune_s=r["prune_s"], data_s=r["data_s"], times=r["times"],
                       rel_char_acc=s["char_acc"] / base["char_acc"])
            rows.append(row)
            print(f"  {cfg.label:34s} T={target:.2f} FLOPs {r['flops']:.3f} char {100 * s['char_acc']:6.2f}% "
                  f"line {100 * s['line_acc']:6.2f}%  prune {r['prune_s']:.1f}s (data passes {r['data_s']:.1f}s)")
    return {"original": base, "calib_lines": len(calib), "eval_lines": len(ev), "rows": rows}


# -- PP-OCR direction classifier -------------------------------------------------------------------
def cls_table(a, paths, fonts) -> dict:
    """Direction classifier (0 / 180 degrees): accuracy and the channels each allocation keeps at 0.9."""
    def data(n, seed):
        y = np.random.default_rng(seed).integers(0, 2, n)
        x, _ = make_lines(n, seed, fonts, height=48, width=192, turned=y)
        return x, y

    calib, _ = data(a.calib, 3000)
    ev, y = data(a.lines, 4000)
    acc = lambda m: float((run_batches(session(m, a.threads), ev).argmax(-1) == y).mean())  # noqa: E731
    base = acc(str(paths["cls"]))
    print(f"original direction classifier: accuracy {100 * base:.2f}%")
    rows = []
    for cfg in configs(True, a.rows):
        why = available(cfg)
        if why:
            rows.append({"config": cfg.label, "unavailable": why})
            continue
        for target in a.cls_targets:
            r = prune_one(paths["cls"], CLS_SHAPE, target, cfg, calib)
            row = {"config": cfg.label, "target": target, "flops": r["flops"], "acc": acc(r.pop("model")),
                   "prune_s": r["prune_s"], "kept": {str(k): v for k, v in r["kept"].items()}}
            rows.append(row)
            print(f"  cls {cfg.label:34s} T={target:.2f} FLOPs {row['flops']:.3f} acc {100 * row['acc']:.2f}% "
                  f"kept {[v for v in row['kept'].values()][:8]}")
    return {"original": base, "rows": rows}


# -- ResNet-20 on digits, trained here -------------------------------------------------------------
def digits_table(a) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import graphprune
    from digits import trained_resnet20

    from graphprune.passes.training import evaluate

    model, tr, te, base, train_s = trained_resnet20(a.digits_epochs)
    print(f"ResNet-20 digits 16x16: trained {a.digits_epochs} epochs in {train_s:.0f}s, "
          f"accuracy {100 * base:.2f}%")
    calib = tr.x[torch.randperm(len(tr.x), generator=torch.Generator().manual_seed(1))[: a.calib]]
    rows = []
    for cfg in configs(a.quick, a.rows):
        why = available(cfg)
        if why:
            rows.append({"config": cfg.label, "unavailable": why})
            continue
        for target in a.targets:
            row = {"config": cfg.label, "target": target}
            try:
                t = time.perf_counter()
                supported = set(inspect.signature(graphprune.prune).parameters)
                res = graphprune.prune(model, tr.x[:1], target_flops=target, **cfg.kwargs(calib, supported))
                row.update(flops=res.plan.achieved, prune_s=time.perf_counter() - t,
                           acc=evaluate(res.model, te.x, te.y, "cpu"))
                row["rel_acc"] = row["acc"] / base
                print(f"  digits {cfg.label:34s} T={target:.2f} FLOPs {row['flops']:.3f} acc {100 * row['acc']:.2f}%")
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                print(f"  digits {cfg.label:34s} T={target:.2f} error {row['error']}")
            rows.append(row)
    return {"original": base, "epochs": a.digits_epochs, "rows": rows}


# -- output ----------------------------------------------------------------------------------------
def grid(rows: list[dict], targets: list[float], cell) -> list[str]:
    labels = list(dict.fromkeys(r["config"] for r in rows))
    out = ["| pipeline | " + " | ".join(f"{t:g}" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
    for label in labels:
        rs = [r for r in rows if r["config"] == label]
        if "unavailable" in rs[0]:
            out.append(f"| {label} | " + " | ".join("n/a" for _ in targets) + " |")
            continue
        by_t = {r["target"]: r for r in rs}
        out.append(f"| {label} | " + " | ".join(cell(by_t[t]) if t in by_t else "" for t in targets) + " |")
    return out


def markdown(res: dict, a) -> str:
    ocr = res["ocr"]
    lines = [
        "# Accuracy after pruning without training",
        "",
        # the results block lets tests/test_documented_figures.py trace every figure to the JSON
        f"<!-- results: benchmarks/results/{res['name']}.json (benchmarks/ocr_accuracy.py) -->",
        f"Generated by `python benchmarks/ocr_accuracy.py{' --quick' if a.quick else ''}` "
        f"(results in `benchmarks/results/{res['name']}.json`; {res['total_s']:.0f}s on this machine, "
        f"onnxruntime {a.threads} thread(s), channel counts in multiples of {a.round_to}). "
        "Rows are cumulative pipelines: the difference between two rows is "
        "what one pass contributes. Columns are FLOPs targets (fraction kept).",
        *(["", f"Note: {res['note']}"] if res.get("note") else []),
        "",
        "## PP-OCRv4 text recognition (rapidocr-onnxruntime 1.4.4)",
        "",
        f"{ocr['calib_lines']} unlabeled calibration lines, {ocr['eval_lines']} separate evaluation lines (rendered "
        f"with the DejaVu fonts, words and numbers, light blur and noise). The original reads "
        f"{100 * ocr['original']['char_acc']:.2f}% of characters and {100 * ocr['original']['line_acc']:.2f}% of lines.",
        "",
        "Character accuracy relative to the original (%):",
        "",
        *grid(ocr["rows"], a.targets, lambda r: "error" if "error" in r else f"{100 * r['rel_char_acc']:.1f}"),
        "",
        "Line accuracy (%):",
        "",
        *grid(ocr["rows"], a.targets, lambda r: "error" if "error" in r else f"{100 * r['line_acc']:.1f}"),
        "",
        "Time of the whole prune call (s), and in brackets the data-driven passes' share "
        "(scoring, sensitivity, compensation, reconstruction):",
        "",
        *grid(ocr["rows"], a.targets,
              lambda r: "error" if "error" in r else f"{r['prune_s']:.1f} ({r['data_s']:.1f})"),
        "",
    ]
    errs = [r for r in ocr["rows"] if "error" in r]
    if errs:
        lines += ["Errors:", ""] + [f"- {r['config']} at {r['target']:g}: {r['error']}" for r in errs] + [""]
    if res.get("cls"):
        cls = res["cls"]
        lines += ["## PP-OCR text-direction classifier (ch_ppocr_mobile_v2.0_cls)", "",
                  f"Rendered lines, half turned by 180 degrees; the original is right on "
                  f"{100 * cls['original']:.1f}%. Accuracy (%), chance is 50%:", "",
                  *grid(cls["rows"], a.cls_targets, lambda r: f"{100 * r['acc']:.1f}"), ""]
        lines += ["Channels kept per prunable group (kept/total) at the smallest target:", ""]
        t_min = min(a.cls_targets)
        for r in cls["rows"]:
            if r.get("target") == t_min:
                kept = ", ".join(f"{k}/{n}" for k, n in (v for v in r["kept"].values() if v))
                lines.append(f"- {r['config']}: {kept}")
        lines.append("")
    if res.get("digits"):
        d = res["digits"]
        lines += ["## ResNet-20 trained here on digits (16x16), no fine-tuning", "",
                  f"Trained {d['epochs']} epochs on CPU; test accuracy {100 * d['original']:.2f}%. "
                  "Test accuracy after pruning (%):", "",
                  *grid(d["rows"], a.targets, lambda r: "error" if "error" in r else f"{100 * r['acc']:.1f}"), ""]
    lines += ["<!-- /results -->", ""]
    return "\n".join(lines)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer targets, pipelines and evaluation lines")
    p.add_argument("--cache", default=os.environ.get("GRAPHPRUNE_CACHE", "/work/cache/wheels"))
    p.add_argument("--targets", type=float, nargs="+")
    p.add_argument("--cls-targets", type=float, nargs="+", default=[0.9, 0.7])
    p.add_argument("--lines", type=int, help="evaluation lines (default 500, quick 200)")
    p.add_argument("--calib", type=int, default=256, help="calibration lines")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--digits-epochs", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["ocr", "cls", "digits"])
    p.add_argument("--rows", nargs="*", help="only the pipelines with these labels (e.g. 'act + lsq')")
    p.add_argument("--round-to", default="1",
                   help="channel multiple passed to prune (default 1: exact FLOPs targets, as in the committed "
                        "table; 'auto' is the CLI's default)")
    p.add_argument("--render", metavar="JSON", help="only rewrite --doc from an existing results file")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "accuracy.md"))
    a = p.parse_args()
    if a.targets is None:
        a.targets = [0.9, 0.8, 0.6, 0.5] if a.quick else TARGETS
    if a.lines is None:
        a.lines = 200 if a.quick else 500
    return a


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown_of(res: dict) -> str:
    """The doc page of a results file alone, with the settings the run recorded (render_docs.py uses it)."""
    a = argparse.Namespace(**{k: res["args"][k] for k in ("quick", "targets", "cls_targets", "threads")})
    a.round_to = str(res["args"].get("round_to", "1"))
    return markdown(res, a)


def write_doc(doc: Path, res: dict, text: str) -> None:
    """Replace this results file's block in the doc, keeping the rest of the page (other sections)."""
    from mdtable import replace_block

    block = text[text.index("<!-- results:"):text.index("<!-- /results -->") + len("<!-- /results -->")]
    page = doc.read_text() if doc.exists() else text
    write_atomic(doc, replace_block(page, f"benchmarks/results/{res['name']}.json", block))


def render(a: argparse.Namespace) -> None:
    """Regenerate the doc's block from a results file (the tables alone: benchmarks/render_docs.py)."""
    res = json.loads(Path(a.render).read_text())
    text = markdown_of(res)
    write_doc(Path(a.doc), res, text)
    print(text)


def main() -> None:
    global ROUND_TO
    a = parse()
    if a.render:
        render(a)
        return
    ROUND_TO = a.round_to
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    paths = fetch_models(Path(a.cache))
    fonts = dejavu_fonts()
    t0 = time.perf_counter()
    name = "ocr_accuracy_quick" if a.quick else "ocr_accuracy"
    res: dict = {"name": name, "args": vars(a), "fonts": [os.path.basename(f) for f in fonts]}
    if "ocr" not in a.skip:
        res["ocr"] = ocr_table(a, paths, fonts)
    if "cls" not in a.skip:
        res["cls"] = cls_table(a, paths, fonts)
    if "digits" not in a.skip:
        import torch

        torch.set_num_threads(a.threads)
        res["digits"] = digits_table(a)
    res["total_s"] = time.perf_counter() - t0
    write_atomic(Path(a.out) / f"{name}.json", json.dumps(res, indent=1, default=str))
    if "ocr" in res:
        text = markdown(res, a)
        write_doc(Path(a.doc), res, text)
        print(text)


if __name__ == "__main__":
    main()
