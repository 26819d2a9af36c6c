"""Regenerate every table of README.md and docs/*.md that sits in a results block, from its results file(s).

A documented table is data, so it is rendered, never typed. Each results block

    <!-- results: benchmarks/results/FILE.json [more files] (benchmarks/SCRIPT.py) -->
    ... prose and markdown tables ...
    <!-- /results -->

is matched to a renderer by the name of its first results file that some renderer's pattern covers
(RENDERERS below: one row per results-file pattern, so a new run such as peer_latency_s3.json renders
with no change here). The renderer turns the block's results files into markdown; each table of the
block is replaced by the rendered table with the same header row (the i-th table with a given header
by the i-th rendered one), so a block may show a subset of what its files render. Prose is left alone
(its figures are checked by tests/test_documented_figures.py).

    python benchmarks/render_docs.py            # rewrite the tables in place
    python benchmarks/render_docs.py --check    # change nothing; exit 1 listing every table that differs
    python benchmarks/render_docs.py --list     # which renderer covers which block

A block with a table and no renderer fails --check (unless its results file is in UNRENDERED, the
allowlist of tables still typed by hand, which only shrinks).
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
import importlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
OPEN = re.compile(r"<!-- results: (?P<refs>[^>]*?) -->")
CLOSE = "<!-- /results -->"
SIMILAR = 0.6  # header similarity under which a documented table counts as one no renderer makes
RESULT_FILE = re.compile(r"[\w./-]+\.(?:json|md|txt|csv|log)")


def docs(root: Path = ROOT) -> list[Path]:
    """README.md and docs/*.md: every page that may carry measured figures."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# -- parsing -----------------------------------------------------------------------------------------
@dataclass
class Table:
    start: int  # index of the header line in the page's lines
    lines: list[str]

    @property
    def header(self) -> str:
        return self.lines[0].strip()


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening comment
    refs: str
    files: list[Path]
    tables: list[Table]


def tables_in(lines: list[str], offset: int = 0) -> list[Table]:
    """Maximal runs of lines starting with '|' (a markdown table: header, rule, rows)."""
    out: list[Table] = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("|"):
            if out and out[-1].start + len(out[-1].lines) == offset + i:
                out[-1].lines.append(line)
            else:
                out.append(Table(offset + i, [line]))
    return [t for t in out if len(t.lines) >= 2]


def blocks_in(doc: Path, root: Path = ROOT) -> list[Block]:
    """The results blocks of one page, outside fenced code."""
    lines = doc.read_text().split("\n")
    out: list[Block] = []
    fenced, start, refs = False, None, ""
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced:
            continue
        m = OPEN.search(line)
        if m and start is None:
            start, refs = i, m["refs"]
            continue
        if CLOSE in line and start is not None:
            files = [root / p for p in RESULT_FILE.findall(refs)]
            out.append(Block(doc, start + 1, refs, files, tables_in(lines[start + 1:i], start + 1)))
            start = None
    return out


# -- renderers ---------------------------------------------------------------------------------------
if str(HERE) not in sys.path:  # the benchmark scripts import each other as top-level modules
    sys.path.insert(0, str(HERE))

from mdtable import md_table  # noqa: E402


def _load(path: Path):
    return json.loads(path.read_text())


def _script(name: str):
    """A benchmark script as a module, imported only when one of its blocks is rendered."""
    return importlib.import_module(name)


def _rel(path: Path) -> str:
    return path.resolve().relative_to(ROOT).as_posix() if path.resolve().is_relative_to(ROOT) else str(path)


def _peer_latency(files: list[Path]) -> str:
    mod = _script("peer_latency")
    return "\n\n".join(mod.render(_load(f), _rel(f)) for f in files if f.suffix == ".json")





def _gpu_latency(files: list[Path]) -> str:
    return _script("gpu_latency").markdown([f for f in files if f.suffix == ".json"])



def _accuracy(files: list[Path]) -> str:
    res = _load(next(f for f in files if f.suffix == ".json"))
    return _script("accuracy").markdown(res["summary"], argparse.Namespace(**res["args"]), res["total_s"])



def _distill(files: list[Path]) -> str:
    """distill_ocr.py's report over every part in the block's files (a merged report or single runs)."""
    parts: list[dict] = []
    for f in files:
        if f.suffix == ".json":
            d = _load(f)
            parts += d["parts"] if isinstance(d, dict) and "parts" in d else [d] if isinstance(d, dict) else d
    return _script("distill_ocr").markdown([p for p in parts if isinstance(p, dict) and "kind" in p])


def _ms(v: float) -> str:
    return f"{v:.0f} ms" if v >= 100 else f"{v:.2f} ms"


def _tvm_tuning(files: list[Path]) -> str:
    """One table per tvm_tuning.py results file: onnxruntime, TVM untuned, then each tuning budget."""
    out = []
    for f in files:
        if f.suffix != ".json":
            continue
        rep = _load(f)
        models = list(rep["models"])
        if rep.get("slim_partial") and not any(m["model"] == rep["slim_partial"]["model"] for m in models):
            models.append({**rep["slim_partial"], "tuning": [], "partial": True})  # run stopped while tuning it
        budgets = list(dict.fromkeys(t["budget_s"] for m in models for t in m.get("tuning", [])))
        unscheduled = any("tvm_unscheduled_ms" in m for m in models)
        # since session 5 the last snapshot's records are also checked in the model (tvm_verify)
        checked = [b for b in budgets if any("tvm_verified_ms" in t for m in models for t in m.get("tuning", [])
                                             if t["budget_s"] == b)]
        header = ["model", "onnxruntime", *(["TVM unscheduled"] if unscheduled else []),
                  "TVM default schedule (no tuning)", *(f"TVM tuned, {b:g} s" for b in budgets),
                  *(f"TVM tuned, {b:g} s, checked in the model" for b in checked)]
        rows = []
        for m in models:
            name = m["model"].replace("_slim", " slim")
            if m["model"].endswith("_slim") and "slim_macs_ratio" in rep:
                name += f" ({rep['slim_macs_ratio']:.2f} MACs)"
            elif m["model"].startswith("resnet18_slim_r"):  # a second slim, measured untuned (tvm_device.sh)
                multiple = m["model"].rsplit("_r", 1)[1]
                name = f"resnet18 slim ({rep[f'slim_r{multiple}_macs_ratio']:.2f} MACs, --round-to {multiple})"
            tuned = {t["budget_s"]: t for t in m.get("tuning", [])}
            cells = [f"{_ms(t['tvm_ms'])} ({_kernels_cell(t)}, {t['new_trials']} new trials)"
                     if t else "not reached" if m.get("partial") else "-" for t in map(tuned.get, budgets)]
            cells += [_verified_cell(m, tuned.get(b)) for b in checked]
            rows.append([name, _ms(m["ort_ms"]), *([_ms(m["tvm_unscheduled_ms"])] if unscheduled else []),
                         _ms(m["tvm_default_schedule_ms"]), *cells])
        out.append(md_table(header, rows))
        ratios = _slim_ratios(models)
        if ratios:
            out.append(ratios)
    return "\n\n".join(out)


def _slim_ratios(models: list[dict]) -> str:
    """Slim speed-up over the original under TVM per build, from the interleaved rounds (`tvm_rounds_ms`):
    the ratio of the medians over rounds, and of the fastest rounds (on a host whose rounds of one build
    spread by 10-30%, the fastest round is the steadier estimate of what a build can do)."""
    orig = next((m.get("tvm_rounds_ms") for m in models if m["model"] == "resnet18"), None)
    if not orig:
        return ""
    rows = []
    for m in models:
        rounds = m.get("tvm_rounds_ms")
        if m["model"] == "resnet18" or not rounds:
            continue
        name = m["model"].replace("_slim", " slim")
        for build in [b for b in rounds if b in orig]:
            med = float(np.median(orig[build])) / float(np.median(rounds[build]))
            fast = min(orig[build]) / min(rounds[build])
            rows.append([name, build, f"{med:.2f}x", f"{fast:.2f}x"])
        best_o = min(min(v) for v in orig.values())
        best_s = min(min(v) for v in rounds.values())
        rows.append([name, "fastest build of each", "-", f"{best_o / best_s:.2f}x"])
    return md_table(["slim", "build (same for both models)", "speed-up, medians of rounds",
                     "speed-up, fastest rounds"], rows) if rows else ""


def _verified_cell(m: dict, t: dict | None) -> str:
    """The checked build of a snapshot: its latency and what the check kept and reverted."""
    if not t or "tvm_verified_ms" not in t:
        return "-"
    v = m.get("verification", {})
    what = "all records set aside (tuned model slower)" if v.get("model_fallback") else \
        f"{len(v.get('kept', []))} kernels kept, {len(v.get('reverted', []))} reverted"
    return f"{_ms(t['tvm_verified_ms'])} ({what})"


def _kernels_cell(t: dict) -> str:
    """Kernels with records; since session 4 every kernel's default schedule is a record, so say how many
    were searched beyond it."""
    if "kernels_searched" in t:
        return f"{t['kernels_tuned']}/{t['kernels']} kernels with records, {t['kernels_searched']} searched"
    return f"{t['kernels_tuned']}/{t['kernels']} kernels tuned"


def _tvm_schedules(files: list[Path]) -> str:
    """tvm_schedules.py: untuned TVM in three default-schedule variants against onnxruntime (ms, and x ORT)."""
    rep = _load(files[0])
    variants = [("nchw", "NCHW (session 2 rules)"), ("nhwc", "channels-last"),
                ("nhwc_prepacked", "channels-last + pre-packed weights (default)")]
    rows = []
    for m in rep["models"]:
        name = m["model"].replace("_slim_r", " slim, --round-to ")
        if m["model"].startswith("resnet18_slim_r"):
            name += f" ({rep['slim_r' + m['model'].rsplit('_r', 1)[1] + '_macs_ratio']:.2f} MACs)"
        rows.append([name, _ms(m["ort_ms"]),
                     *(f"{_ms(m[f'tvm_{v}_ms'])} ({m[f'tvm_{v}_over_ort']:.2f}x)" for v, _ in variants)])
    return md_table(["model", "onnxruntime", *(f"TVM {label}" for _, label in variants)], rows)


def _di_run(r: dict) -> str:
    if r.get("sweep") == "layer":
        return f"one map, {r['channels']} ch"
    what = "built-in example" if r.get("model") == "example" else r.get("model", "PP-OCRv4 rec")
    return f"{what}, {100 * r['target']:.0f} % FLOPs"


def _di_result(r: dict) -> str:
    if not r.get("finished", True):
        return "not finished"
    return f"{r['removed']} removed" if "macs_ratio" not in r else f"MACs {r['macs_ratio']:.4f}, {r['removed']} removed"


def _di_scale(files: list[Path]) -> str:
    """di_scale.py's rows (one feature map, the built-in example, torchvision models; plus di_ppocr.py's
    PP-OCR rows) in two layouts: CPU and wall seconds (a loaded machine), and the capture/search split."""
    rows = [r for f in files if f.suffix == ".json" and f.name.startswith("di_scale") for r in _load(f)["rows"]]
    ocr = [{"samples": d["meta"]["samples"], **r} for f in files if f.suffix == ".json" and f.name.startswith("di_ppocr")
           for d in [_load(f)] for r in d["rows"]]
    impl = {"new": "incremental", "old": "original"}
    loaded = []
    for r in rows:
        if not r["finished"]:
            loaded.append([_di_run(r), impl[r["impl"]], r["samples"], "-", f"> {r['timeout_s']:g} (stopped)", "-",
                           "not finished"])
            continue
        cpu = (f"{r['capture_cpu_s']:.2f} + {r['search_cpu_s']:.2f} = {r['total_cpu_s']:.2f}" if "capture_cpu_s" in r
               else f"{r['search_cpu_s']:.2f} (search)")
        wall = r["search_s"] if r["sweep"] == "layer" else r["total_s"]
        loaded.append([_di_run(r), impl[r["impl"]], r["samples"], cpu, f"{wall:.1f}", f"{r['peak_rss_mb']:.0f}",
                       _di_result(r)])
    loaded += [[_di_run(r), "incremental", f"{r.get('samples', '')} lines", f"{r['cpu_s']:.1f} (whole prune)",
                f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}", _di_result(r)] for r in ocr]
    split = []
    for r in rows:
        if r["sweep"] == "layer":
            continue
        if not r["finished"]:
            split.append([_di_run(r), impl[r["impl"]], r["samples"], "-", "-", f"> {r['timeout_s']:g} (stopped)", "-",
                          "-", "not finished"])
            continue
        split.append([_di_run(r), impl[r["impl"]], r["samples"], f"{r['capture_s']:.2f}", f"{r['search_s']:.2f}",
                      f"{r['total_s']:.2f}", f"{r['search_cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", _di_result(r)])
    return "\n\n".join([
        md_table(["run", "impl", "samples", "CPU s (capture + search)", "wall s (loaded machine)", "peak RSS MB",
                  "result"], loaded),
        md_table(["run", "impl", "samples", "capture s", "search s", "total s", "search CPU s", "peak RSS MB", "result"],
                 split)])



def _channel_multiples(files: list[Path]) -> str:
    """graphprune calibrate's table: efficiency gain per candidate multiple and the one chosen."""
    entries = _load(files[0])
    ms = [m for m in next(iter(entries.values()))["gains"] if m != "1"]
    rows = [[hw, e["measured_on"], *(f"{e['gains'][m]:.4f}" for m in ms), e["multiple"]] for hw, e in entries.items()]
    return md_table(["hardware", "measured on", *(f"gain m={m}" if k == 0 else f"m={m}" for k, m in enumerate(ms)),
                     "chosen"], rows)


def _round_to_rule(files: list[Path]) -> str:
    rows = [[r["model"], f"{r['macs_ratio']['strict']:.4f} / {r['macs_ratio']['halved']:.4f}",
             f"{r['speedup']['strict']:.2f}x", f"{r['speedup']['strict_again']:.2f}x", f"{r['speedup']['halved']:.2f}x"]
            for r in _load(files[0])["models"]]
    return md_table(["model", "FLOPs kept strict / halved", "strict", "strict (again)", "halved (default)"], rows)






def _big_model_memory(files: list[Path]) -> str:
    def mb(r: dict, key: str) -> str:
        return f"{r[key + '_mb']:.1f}" + (" (over 2^31 bytes)" if r["over_2gb"][key] else "")

    rows = [[mb(r, "model"), mb(r, "output"), f"{r['peak_rss_mb']:.1f}", f"{r['peak_over_model']:.3f}",
             f"{r['peak_minus_baseline_over_model']:.3f}"] for r in _load(files[0])["rows"]]
    return md_table(["model (MiB)", "output (MiB)", "peak RSS (MiB)", "peak / model",
                     "(peak - tiny-model baseline) / model"], rows)


@dataclass(frozen=True)
class Renderer:
    pattern: str  # fnmatch pattern on a results file's name
    render: Callable[[list[Path]], str]  # the block's results files -> markdown holding its tables
    source: str  # where the formatting lives, for --list


def _script_renders(pattern: str, script: str, fn: str = "markdown") -> Renderer:
    """A results file its own script formats: benchmarks/<script>.py's fn(the block's first file)."""
    def render(files: list[Path]) -> str:
        return getattr(_script(script), fn)(_load(files[0]))

    return Renderer(pattern, render, f"benchmarks/{script}.py: {fn}")


RENDERERS: list[Renderer] = [
    Renderer("peer_latency*.json", _peer_latency, "benchmarks/peer_latency.py: render"),
    _script_renders("ocr_accuracy*.json", "ocr_accuracy", "markdown_of"),
    _script_renders("prune_zoo*.json", "prune_zoo"),
    _script_renders("plan_stability*.json", "plan_stability", "render"),
    Renderer("gpu_latency*.json", _gpu_latency, "benchmarks/gpu_latency.py: markdown"),
    _script_renders("latency_aware*.json", "latency_aware"),
    Renderer("accuracy*.json", _accuracy, "benchmarks/accuracy.py: markdown"),
    _script_renders("timm_coverage*.json", "timm_coverage"),
    Renderer("distill*.json", _distill, "benchmarks/distill_ocr.py: markdown"),
    Renderer("tvm_tuning*.json", _tvm_tuning, "benchmarks/render_docs.py: _tvm_tuning"),
    Renderer("tvm_schedules*.json", _tvm_schedules, "benchmarks/render_docs.py: _tvm_schedules"),
    _script_renders("tvm_parallel*.json", "tvm_parallel"),
    Renderer("di_scale*.json", _di_scale, "benchmarks/render_docs.py: _di_scale"),
    _script_renders("real_models*.json", "real_models"),
    Renderer("channel_multiples*.json", _channel_multiples, "benchmarks/render_docs.py: _channel_multiples"),
    Renderer("round_to_rule*.json", _round_to_rule, "benchmarks/render_docs.py: _round_to_rule"),
    Renderer("big_model_memory*.json", _big_model_memory, "benchmarks/render_docs.py: _big_model_memory"),
    _script_renders("rule_sweep*.json", "rule_sweep"),
    _script_renders("speed_order_accuracy*.json", "speed_order_accuracy"),
    _script_renders("norm_channels_accuracy*.json", "norm_channels_accuracy"),
    _script_renders("norm_channels_speed*.json", "norm_channels_speed"),
]

# Results files whose documented tables are still typed by hand. Only ever shrinks: a new table
# gets a renderer above.
UNRENDERED: set[str] = set()


def renderer_for(block: Block) -> Renderer | None:
    for f in block.files:
        for r in RENDERERS:
            if fnmatch.fnmatch(f.name, r.pattern):
                return r
    return None


def allowlisted(block: Block) -> bool:
    return any(fnmatch.fnmatch(f.name, p) for f in block.files for p in UNRENDERED)


# -- checking and rewriting --------------------------------------------------------------------------
@dataclass
class Outcome:
    block: Block
    renderer: Renderer | None
    new: dict[int, list[str]]  # table start -> rendered lines (only for tables that differ)
    problems: list[str]  # what rewriting cannot fix: no renderer, a table it does not render, a missing file
    diffs: list[str]  # tables that differ from their rendering (rewriting fixes them)


def _where(block: Block, t: Table | None = None) -> str:
    line = t.start + 1 if t else block.line
    return f"{_rel(block.doc)}:{line}"


def _first_difference(old: list[str], new: list[str]) -> str:
    for k, (a, b) in enumerate(zip(old, new)):
        if a.rstrip() != b.rstrip():
            return f"row {k + 1}: doc '{a.strip()[:90]}' vs rendered '{b.strip()[:90]}'"
    return f"doc has {len(old)} lines, rendered {len(new)}"


def examine(block: Block) -> Outcome:
    """Render one block and compare its tables with what its results files give."""
    out = Outcome(block, renderer_for(block), {}, [], [])
    if not block.tables:
        return out
    if out.renderer is None:
        if not allowlisted(block):
            out.problems.append(f"{_where(block)}: {len(block.tables)} table(s) in the block for '{block.refs}' "
                                "and no renderer in benchmarks/render_docs.py RENDERERS")
        return out
    missing = [_rel(f) for f in block.files if not f.exists()]
    if missing:
        out.problems.append(f"{_where(block)}: results file(s) missing: {missing}")
        return out
    try:
        text = out.renderer.render(block.files)
    except Exception as exc:  # noqa: BLE001 - a renderer that breaks on its file is a finding, not a crash
        out.problems.append(f"{_where(block)}: renderer {out.renderer.source} failed: {type(exc).__name__}: {exc}")
        return out
    for t, r in zip(block.tables, pair(block.tables, tables_in(text.split("\n")))):
        if r is None:
            out.problems.append(f"{_where(block, t)}: table '{t.header[:80]}' is not rendered by "
                                f"{out.renderer.source} from {[f.name for f in block.files]}")
            continue
        new = [line.rstrip() for line in r.lines]
        if [line.rstrip() for line in t.lines] != new:
            out.new[t.start] = new
            out.diffs.append(f"{_where(block, t)}: table '{t.header[:60]}' differs from "
                             f"{[f.name for f in block.files]}: {_first_difference(t.lines, new)}")
    return out


def pair(documented: list[Table], rendered: list[Table]) -> list[Table | None]:
    """The rendered table behind each documented one: the same header first (in order among equal
    headers), then, for a header edited by hand or renamed in a renderer, the most similar unused header."""
    free = list(rendered)
    out: list[Table | None] = []
    for t in documented:
        same = next((r for r in free if r.header == t.header), None)
        if same is not None:
            free.remove(same)
        out.append(same)
    for k, t in enumerate(documented):
        if out[k] is None and free:
            best = max(free, key=lambda r: difflib.SequenceMatcher(None, r.header, t.header).ratio())
            if difflib.SequenceMatcher(None, best.header, t.header).ratio() >= SIMILAR:
                free.remove(best)
                out[k] = best
    return out


def rewrite(doc: Path, outcomes: list[Outcome]) -> bool:
    """Replace the differing tables of one page; atomic, and only when something changed."""
    changes = {start: new for o in outcomes if o.block.doc == doc for start, new in o.new.items()}
    if not changes:
        return False
    lines = doc.read_text().split("\n")
    tables = {t.start: t for o in outcomes if o.block.doc == doc for t in o.block.tables}
    for start in sorted(changes, reverse=True):
        lines[start:start + len(tables[start].lines)] = changes[start]
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=f".{doc.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        os.chmod(tmp, doc.stat().st_mode & 0o777)
        os.replace(tmp, doc)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def run(pages: list[Path], mode: str, root: Path = ROOT) -> int:
    outcomes = [examine(b) for p in pages for b in blocks_in(p, root)]
    if mode == "list":
        for o in outcomes:
            b = o.block
            what = (o.renderer.source if o.renderer else
                    "no tables" if not b.tables else "UNRENDERED (allowlisted)" if allowlisted(b) else "NO RENDERER")
            print(f"{_rel(b.doc)}:{b.line}  {len(b.tables)} table(s)  {' '.join(f.name for f in b.files)}  ->  {what}")
        return 0
    problems = [p for o in outcomes for p in o.problems]
    if mode == "check":
        problems += [d for o in outcomes for d in o.diffs]
        for p in problems:
            print(p)
        if problems:
            print(f"{len(problems)} problem(s); regenerate with: python benchmarks/render_docs.py", file=sys.stderr)
            return 1
        covered = sum(len(o.block.tables) for o in outcomes if o.renderer)
        print(f"{covered} documented table(s) match their results files")
        return 0
    changed = [p for p in pages if rewrite(p, outcomes)]
    for p in changed:
        print(f"rewrote {_rel(p)}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its data")
    mode.add_argument("--list", action="store_true", help="show which renderer covers which results block")
    ap.add_argument("pages", nargs="*", type=Path, help="pages to process (default: README.md and docs/*.md)")
    a = ap.parse_args(argv)
    pages = [p.resolve() for p in a.pages] or docs()
    bad = [str(p) for p in pages if not p.is_file()]
    if bad:
        print(f"render_docs: no such page: {bad[0]}", file=sys.stderr)
        return 2
    return run(pages, "check" if a.check else "list" if a.list else "write")


if __name__ == "__main__":
    sys.exit(main())
