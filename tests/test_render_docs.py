"""Every table in a results block of README.md / docs/*.md is what benchmarks/render_docs.py renders
from its results file(s): a table can neither drift from its data nor be typed without a renderer."""
from __future__ import annotations

import importlib.util
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


def _edit_cell(page: Path, old: str, new: str) -> int:
    lines = page.read_text().split("\n")
    k = next(i for i, line in enumerate(lines) if line.startswith("|") and old in line)
    lines[k] = lines[k].replace(old, new, 1)
    page.write_text("\n".join(lines))
    return k + 1


def test_a_table_edited_by_hand_is_detected_and_regenerated(rd, pages, capsys):
    page = pages / "docs" / "benchmarks.md"
    original = page.read_text()
    _edit_cell(page, "| resnet50 | global | 30 | 76.25 | 37.59 | 2.03x |",
                      "| resnet50 | global | 30 | 76.25 | 37.59 | 2.13x |")
    all_pages = rd.docs(pages)
    assert rd.run(all_pages, "check") == 1
    out = capsys.readouterr().out
    assert "benchmarks.md:" in out and "differs from ['prune_zoo.json']" in out and "2.13x" in out
    assert page.read_text() != original  # --check changed nothing
    assert rd.run(all_pages, "write") == 0
    assert page.read_text() == original  # one command puts the data back
    assert rd.run(all_pages, "check") == 0


def test_an_edited_header_and_a_deleted_row_are_detected(rd, pages, capsys):
    page = pages / "docs" / "reliability.md"
    _edit_cell(page, "| peak RSS (MiB) |", "| peak memory (MiB) |")
    acc = pages / "docs" / "methods.md"
    text = acc.read_text()
    row = next(line for line in text.split("\n") if line.startswith("| hbfp | 0.20 |"))
    acc.write_text(text.replace(row + "\n", "", 1))
    assert rd.run(rd.docs(pages), "check") == 1
    out = capsys.readouterr().out
    assert "reliability.md" in out and "methods.md" in out


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
