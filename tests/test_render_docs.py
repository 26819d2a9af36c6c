"""Every table in a results block of README.md / docs/*.md is what benchmarks/render_docs.py renders
from its results file(s): a table can neither drift from its data nor be typed without a renderer."""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rd():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "benchmarks" / "render_docs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def pages(tmp_path):
    """A copy of README.md and docs/*.md (results files stay in the repository)."""
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    for p in (ROOT / "docs").glob("*.md"):
        shutil.copy(p, tmp_path / "docs" / p.name)
    return tmp_path


def test_the_docs_tables_match_their_results_files(rd, capsys):
    assert rd.main(["--check"]) == 0, capsys.readouterr().out


def test_every_table_in_a_results_block_has_a_renderer(rd):
    blocks = [b for p in rd.docs() for b in rd.blocks_in(p)]
    with_tables = [b for b in blocks if b.tables]
    assert len(with_tables) >= 20  # the parser finds the blocks at all
    missing = [f"{b.doc.name}:{b.line} {b.refs}" for b in with_tables if rd.renderer_for(b) is None]
    assert not missing
    assert not rd.UNRENDERED, "the allowlist of hand-typed tables only shrinks; it is empty now"


def _tables(rd, pages):
    """(page, table) for every table inside a results block of the copied pages."""
    return [(b.doc, t) for p in rd.docs(pages) for b in rd.blocks_in(p) for t in b.tables]


def _replace_line(page, index: int, new: str | None) -> None:
    lines = page.read_text().split("\n")
    lines[index:index + 1] = [] if new is None else [new]
    page.write_text("\n".join(lines))


def test_a_table_edited_by_hand_is_detected_and_regenerated(rd, pages, capsys):
    page, t = next((p, t) for p, t in _tables(rd, pages) if len(t.lines) > 2 and re.search(r"\d", t.lines[2]))
    original = page.read_text()
    row = t.lines[2]
    digit = re.search(r"\d", row)
    edited = row[:digit.start()] + str((int(digit[0]) + 1) % 10) + row[digit.end():]
    _replace_line(page, t.start + 2, edited)
    all_pages = rd.docs(pages)
    assert rd.run(all_pages, "check") == 1
    out = capsys.readouterr().out
    assert f"{page}:{t.start + 1}: table" in out and "differs from" in out and edited.strip()[:60] in out
    assert page.read_text() != original  # --check changed nothing
    assert rd.run(all_pages, "write") == 0
    assert page.read_text() == original  # one command puts the data back
    assert rd.run(all_pages, "check") == 0


def test_an_edited_header_and_a_deleted_row_are_detected(rd, pages, capsys):
    tables = _tables(rd, pages)
    (p1, t1), (p2, t2) = tables[0], tables[-1]
    _replace_line(p1, t1.start, t1.lines[0].replace("|", "| extra |", 1))
    _replace_line(p2, t2.start + len(t2.lines) - 1, None)
    assert rd.run(rd.docs(pages), "check") == 1
    out = capsys.readouterr().out
    assert f"{p1}:{t1.start + 1}:" in out and f"{p2}:{t2.start + 1}:" in out


def test_a_table_without_a_renderer_fails_the_check(rd, pages, capsys):
    page = pages / "docs" / "benchmarks.md"
    page.write_text(page.read_text() + "\n<!-- results: benchmarks/results/layout_scaling.json (benchmarks/layout_scaling.py) -->\n"
                    "| model | achieved |\n|---|---|\n| resnet18 | 0.5 |\n<!-- /results -->\n")
    assert rd.run(rd.docs(pages), "check") == 1
    assert "no renderer" in capsys.readouterr().out
    assert rd.run(rd.docs(pages), "write") == 1  # writing cannot invent one either


def test_list_names_the_renderer_of_each_block(rd, capsys):
    assert rd.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "prune_zoo.json  ->  benchmarks/prune_zoo.py: markdown" in out
    assert "NO RENDERER" not in out


def test_renderers_are_keyed_by_pattern_so_new_runs_render(rd):
    names = ["tvm_tuning_16c_s3.json", "peer_latency_s3.json", "distill_rank_hfp.json", "di_scale_pinned2_s3.json",
             "gpu_latency_r64.json", "accuracy_quick.json"]
    for name in names:
        block = rd.Block(ROOT / "docs" / "x.md", 1, name, [ROOT / "benchmarks" / "results" / name], [])
        assert rd.renderer_for(block) is not None, name


def test_a_missing_page_is_one_line_and_exit_2(rd, capsys):
    assert rd.main(["--check", "no/such/page.md"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such page" in err
