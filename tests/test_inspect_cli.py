"""`graphprune inspect` table/SVG on the small example CNN, the bad-input contract, and the report's latency card."""
import shutil
import xml.etree.ElementTree as ET

import onnx
import pytest
from click.testing import CliRunner

import graphprune
from graphprune.cli import main
from graphprune.examples import example_cnn


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("ex") / "example.onnx"
    onnx.save(example_cnn(), str(p))
    return str(p)


def test_table_explains_groups(model_path):
    res = CliRunner().invoke(main, ["inspect", model_path], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert "channel groups" in out and "prunable" in out
    assert "frozen: model input" in out and "frozen: model output" in out
    view = graphprune.inspect(model_path)
    # the residual Add and the squeeze-excite Mul are what join their groups
    joins = {j.split("_")[0] for g in view["groups"] for j in g["joins"]}
    assert {"Add", "Mul"} <= joins
    assert view["summary"]["prunable_groups"] + view["summary"]["frozen_groups"] == view["summary"]["groups"]


@pytest.mark.parametrize("graphviz", [True, False])
def test_svg_with_and_without_graphviz(model_path, tmp_path, graphviz):
    if graphviz and not shutil.which("dot"):
        pytest.skip("graphviz not installed (apt-get install graphviz)")
    svg = tmp_path / "g.svg"
    args = ["inspect", model_path, "--svg", str(svg)] + ([] if graphviz else ["--no-graphviz"])
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert 'class="edge' in text and "frozen: model input" in text


def test_missing_model_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.onnx")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "error" in res.output


def test_report_shows_latency_when_measured(model_path, tmp_path):
    from graphprune.report.html import render_html_report, write_html_report

    result = graphprune.prune(model_path, target_flops=0.5)
    result.report["latency"] = {"backend": "onnxruntime", "before_ms": 2.0, "after_ms": 1.0, "ratio": 0.5}
    html = render_html_report(result, use_graphviz=False)
    assert "Latency (onnxruntime)" in html and "2.00 → 1.00 ms" in html
    write_html_report(result, tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
