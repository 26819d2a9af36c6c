"""Every measured figure in README.md and docs/ traces to a results file written by a benchmark script.

Convention (docs/benchmarks.md, "Where the numbers come from"): measured figures live inside a block

    <!-- results: benchmarks/results/FILE.json [more files] (benchmarks/SCRIPT.py) -->
    ... tables and sentences with numbers ...
    <!-- /results -->

This test fails when
  - a block names a results file or script that does not exist;
  - a decimal number in a block's prose is not a value of its results files (as stored, as a
    percentage, as a reciprocal - speed-up vs latency ratio - or in k/M/G units), at the precision
    shown (a block's tables are rendered from its files and checked by tests/test_render_docs.py);
  - a measured-looking figure (2.41x, 3.5 ms, 0.035%, 1.2 s, 95.1 ± 1.3) appears outside any block.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- results: (?P<refs>[^>]*?) -->(?P<body>.*?)<!-- /results -->", re.S)
FENCE = re.compile(r"```.*?```", re.S)
DECIMAL = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[-+]?\d+)?)(?![\w.]*\d)")
MEASURED = re.compile(r"(?<![\w.])\d+(\.\d+)?(x\b| ?ms\b| ?TFLOP/s)|(?<![\w.])\d+\.\d+( ?%| ?s\b| ±)")
SCALES = (1.0, 100.0, 1e-3, 1e-6, 1e-9)


def _numbers(obj, out: list[float]) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, dict):
        for v in obj.values():
            _numbers(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers(v, out)
    elif isinstance(obj, str):
        out.extend(float(m) for m in re.findall(r"\d+\.\d+|\d+", obj))


def _load_values(path: Path) -> list[float]:
    values: list[float] = []
    if path.suffix == ".json":
        _numbers(json.loads(path.read_text()), values)
    else:
        _numbers(path.read_text(), values)
    return values


def _backed(text: str, values: list[float]) -> bool:
    mantissa, _, exponent = text.partition("e")  # 5.7e-06: two significant digits of 5.72e-06
    digits = len(mantissa.split(".")[1])
    target = float(text)
    tol = (0.5 * 10 ** -digits + 1e-12) * 10.0 ** int(exponent or 0)
    for v in values:
        if not math.isfinite(v):
            continue
        candidates = [v * s for s in SCALES]
        if v:
            candidates += [1.0 / v, 100.0 / v]
        if any(abs(c - target) <= tol for c in candidates):
            return True
    return False


def _blocks(doc: Path):
    text = FENCE.sub("", doc.read_text())
    return text, list(BLOCK.finditer(text))


def _refs(refs: str) -> tuple[list[Path], list[Path]]:
    paths = [ROOT / p for p in re.findall(r"[\w./-]+\.(?:json|md|txt|csv|log)", refs)]
    scripts = [ROOT / p for p in re.findall(r"benchmarks/[\w./-]+\.(?:py|sh)", refs)]
    return paths, scripts


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_figures_have_results_behind_them(doc):
    text, blocks = _blocks(doc)
    problems = []
    for block in blocks:
        paths, scripts = _refs(block["refs"])
        missing = [str(p.relative_to(ROOT)) for p in paths + scripts if not p.exists()]
        if not paths or not scripts or missing:
            problems.append(f"block '{block['refs']}': needs existing results file(s) and script; missing {missing}")
            continue
        values = [v for p in paths for v in _load_values(p)]
        # a block's tables are rendered from its results files and compared with them row by row
        # (benchmarks/render_docs.py --check, tests/test_render_docs.py), derived figures included; here: prose
        prose = "\n".join(line for line in block["body"].split("\n") if not line.lstrip().startswith("|"))
        unbacked = sorted({m for m in DECIMAL.findall(prose) if not _backed(m, values)})
        if unbacked:
            problems.append(f"block '{block['refs']}': figures not in its results: {unbacked[:12]}")
    outside = BLOCK.sub("", text)
    loose = sorted({m.group(0) for m in MEASURED.finditer(outside)})
    if loose:
        problems.append(f"measured-looking figures outside a results block: {loose[:20]}")
    assert not problems, f"{doc.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_checker_catches_an_unbacked_figure(tmp_path):
    values = _load_values(ROOT / "benchmarks" / "results" / "peer_latency.json")
    row = json.loads((ROOT / "benchmarks" / "results" / "peer_latency.json").read_text())["models"][0]
    shown = f"{row['cpu']['1']['speedup']['graphprune']:.2f}"
    assert _backed(shown, values)
    assert not _backed("987.65", values)
    assert _backed("5.7e-06", [5.7220458984375e-06]) and not _backed("5.8e-06", [5.7220458984375e-06])
    assert DECIMAL.findall("diff 5.7e-06 and 1.25") == ["5.7e-06", "1.25"]
    assert MEASURED.search("runs 2.41x faster") and MEASURED.search("takes 3.5 ms")
    assert MEASURED.search("prunes in 1.2 s") and MEASURED.search("95.56 ± 1.33")
    assert not MEASURED.search("prune to 40% FLOPs with --round-to 8")
