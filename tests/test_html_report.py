"""HTML report: one self-contained file that explains what was removed and what was frozen, and renders
in a real browser (headless Chromium) without console errors or network requests."""
import os
import re

import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from graphprune.cli import main
from graphprune.examples import example_cnn

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def cnn_with_unknown_op() -> onnx.ModelProto:
    """The example CNN with an LRN (no channel rule: the analysis must freeze it) after the stem."""
    m = example_cnn()
    nodes = list(m.graph.node)
    i, relu = next((i, n) for i, n in enumerate(nodes) if n.op_type == "Relu")
    old, new = relu.output[0], relu.output[0] + "_lrn"
    for n in nodes:
        for k, t in enumerate(n.input):
            if t == old:
                n.input[k] = new
    m.graph.node.insert(i + 1, helper.make_node("LRN", [old], [new], size=3, name="odd_lrn"))
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    src = str(d / "model.onnx")
    onnx.save(cnn_with_unknown_op(), src)
    out = d / "report.html"
    res = CliRunner().invoke(main, ["prune", src, "--target-flops", "0.5", "-o", str(d / "slim.onnx"),
                                    "--report", str(out), "--json"])
    assert res.exit_code == 0, res.output
    return out


def test_report_is_self_contained_and_explains_frozen(report_path):
    text = report_path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    # nothing fetched: no external scripts, styles, images or links (SVG namespaces are not fetches)
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text)
    assert "<link" not in text and "@import" not in text
    for section in ("summary", "channels", "groups-section", "frozen", "graph", "settings"):
        assert f'id="{section}"' in text
    # the unknown op and why it froze its channels; the model input/output constraints
    frozen = text[text.index('id="frozen"'):text.index('id="graph"')]
    assert "odd_lrn" in frozen and "LRN" in frozen
    assert "model input" in frozen and "model output" in frozen
    # settings used
    settings = text[text.index('id="settings"'):]
    assert "l1" in settings and "speed" in settings and "50.00%" in settings  # the default strategy
    assert not list(report_path.parent.glob(".graphprune-*"))  # atomic write left no temp file


@pytest.mark.browser
def test_report_renders_in_chromium(report_path, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def record(route):
                requests.append(route.request.url)
                if route.request.url.startswith("file://"):
                    route.continue_()
                else:
                    route.abort()

            page.route("**/*", record)
            page.goto(report_path.as_uri())
            page.wait_for_load_state("load")
            bars = page.locator("#channels svg rect.bar")
            assert bars.count() >= 10
            for k in range(bars.count()):
                box = bars.nth(k).bounding_box()
                assert box and box["width"] > 0 and box["height"] > 0
            graph = page.locator("#graph svg").first
            gbox = graph.bounding_box()
            assert gbox and gbox["width"] > 100 and gbox["height"] > 100
            assert page.locator("#graph svg .edge").count() > 20
            cards = page.locator(".card")
            assert cards.count() >= 2
            page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
            # clicking a group row highlights the edges that carry it
            page.locator("tr.grp:not(.frozen)").first.click()
            assert page.locator("#graph .edge.hl").count() >= 1
            page.locator("#graph").screenshot(path=str(tmp_path / "graph.png"))
        finally:
            browser.close()
    assert not errors, errors
    assert all(u.startswith("file://") for u in requests), requests
    assert (tmp_path / "report.png").stat().st_size > 10_000
    print("screenshot:", tmp_path / "report.png")


def test_report_shows_calibration_recovery(tmp_path):
    """With --calib the report carries what recovery did: calibration size, per-layer least-squares
    error before/after and held-out agreement (issue 11's report fields, here in the HTML)."""
    import numpy as np

    model = example_cnn()
    src = str(tmp_path / "model.onnx")
    onnx.save(model, src)
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{inp.name: np.random.default_rng(0).standard_normal([48, *shape[1:]]).astype(np.float32)})
    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["prune", src, "--target-flops", "0.6", "--calib", str(calib), "--recover", "lsq",
                                    "--round-to", "1", "--no-measure", "-o", str(tmp_path / "slim.onnx"),
                                    "--report", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert 'id="recovery"' in html and "recovery <b>lsq</b>" in html
    rows = re.findall(r'<table id="reconstruction">(.*?)</table>', html, re.S)
    assert rows and rows[0].count("<tr>") >= 2  # header + at least one refitted layer
    assert '<table id="agreement">' in html and "cosine" in html
