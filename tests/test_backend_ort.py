"""onnxruntime latency backend, stats and MAC counting (no TVM needed)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from graphprune.backends.latency import LatencyStats, format_comparison, speedup
from graphprune.backends.macs import count_macs
from graphprune.backends.ort_backend import measure_ort, random_inputs
from graphprune.cli import main


def _conv_model(cout: int = 8) -> onnx.ModelProto:
    """x[1,3,16,16] -> Conv(3->cout, 3x3, pad 1) -> Relu -> GlobalAvgPool -> Flatten -> Gemm(cout->4)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((cout, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(cout, np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((4, cout)).astype(np.float32), "fw"),
        numpy_helper.from_array(np.zeros(4, np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_stats_from_samples():
    s = LatencyStats.from_samples([float(i) for i in range(1, 11)])
    assert s.median_ms == 5.5 and s.p90_ms == 9.0 and s.runs == 10 and s.mean == 5.5
    assert s.stdev == pytest.approx(np.std(np.arange(1, 11), ddof=1))
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_format_comparison_mentions_speedup_and_macs():
    a, b = LatencyStats.from_samples([2.0, 2.0]), LatencyStats.from_samples([1.0, 1.0])
    assert speedup(a, b) == 2.0
    line = format_comparison(a, b, 100, 40)
    assert "2.00x" in line and "2.50x" in line


def test_count_macs_conv_and_gemm():
    # conv: 16*16 output pixels * 8*3*3*3 weights; gemm: 8*4
    assert count_macs(_conv_model(8)) == 16 * 16 * 8 * 27 + 8 * 4
    assert count_macs(_conv_model(4)) == 16 * 16 * 4 * 27 + 4 * 4


def test_count_macs_torch_export_matmul(tmp_path):
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    assert count_macs(path) == 64 * 4 * 3 + 256 * 5


def test_measure_ort_and_inputs():
    model = _conv_model()
    feeds = random_inputs(model)
    assert feeds["x"].shape == (1, 3, 16, 16)
    stats = measure_ort(model, runs=20, warmup=2)
    assert stats.runs == 20 and 0 < stats.median_ms <= stats.p90_ms


def test_cli_bench_compare_json(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_conv_model(16), str(a))
    onnx.save(_conv_model(4), str(b))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", str(a), "--compare", str(b), "--runs", "20", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["macs_ratio"] == pytest.approx((16 * 16 * 16 * 27 + 64) / (16 * 16 * 4 * 27 + 16))
    assert report["speedup"] > 0 and len(report["models"]) == 2
    assert {"median_ms", "p90_ms", "mean", "stdev", "runs"} <= set(report["models"][0]["latency"])


def test_cli_errors_exit_2(tmp_path, monkeypatch):
    a = tmp_path / "a.onnx"
    onnx.save(_conv_model(), str(a))
    res = CliRunner().invoke(main, ["bench", str(a), "--target", "cuda"])
    assert res.exit_code == 2 and "error:" in res.output
    # TVM missing: simulate by hiding the module
    import sys

    monkeypatch.setitem(sys.modules, "tvm", None)
    res = CliRunner().invoke(main, ["tune", str(a), "--db", str(tmp_path / "db")])
    assert res.exit_code == 2
    assert "pip install 'graphprune[tvm]'" in res.output
    assert len(res.output.strip().splitlines()) == 1
