"""CLI contract: prune end to end, JSON report, and one-line errors with exit code 2 for bad input."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.examples import example_cnn


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture()
def example(tmp_path):
    path = tmp_path / "example.onnx"
    onnx.save(example_cnn(), path)
    return path


def test_default_command_prunes_and_reports_json(example, tmp_path):
    out = tmp_path / "slim.onnx"
    before = example.read_bytes()
    proc = run_cli(str(example), "--target-flops", "0.4", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["macs"]["ratio"] <= 0.4
    # --round-to auto keeps this small CNN's 24..96-wide groups at multiples of 16: steps of a few points
    assert abs(report["achieved"] - 0.4) <= 0.015
    assert report["round_to_source"].startswith("auto")
    assert report["params"]["after"] < report["params"]["before"]
    assert all({"id", "channels", "kept", "frozen"} <= set(g) for g in report["groups"])
    onnx.checker.check_model(onnx.load(out))
    assert example.read_bytes() == before  # input untouched


def test_human_table_and_target_params(example, tmp_path):
    out = tmp_path / "slim.onnx"
    proc = run_cli("prune", str(example), "--target-params", "0.5", "-o", str(out), "--round-to", "4")
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "channel groups" in proc.stdout
    assert out.exists()


def test_demo_runs(tmp_path):
    proc = run_cli("demo", "--out-dir", str(tmp_path / "demo"))
    assert proc.returncode == 0, proc.stderr
    assert "max |pruned - masked original|" in proc.stdout


def _no_prunable_model(path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


BAD_INPUTS = {
    "missing": lambda p: None,
    "empty": lambda p: p.write_bytes(b""),
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),  # reproducible: a failure reruns
    "text_file": lambda p: p.write_text("this is not a model\n" * 50),
    "truncated": lambda p: p.write_bytes(example_cnn().SerializeToString()[:3000]),
    "no_prunable": _no_prunable_model,
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_one_line_exit_2_no_output(kind, tmp_path):
    src = tmp_path / "model.onnx"
    BAD_INPUTS[kind](src)
    out = tmp_path / "out.onnx"
    proc = run_cli(str(src), "--target-flops", "0.4", "-o", str(out))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("target", ["0", "-0.5", "1.5", "0.000001"])
def test_impossible_targets(example, tmp_path, target):
    out = tmp_path / "out.onnx"
    proc = run_cli(str(example), "--target-flops", target, "-o", str(out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_output_equal_to_input_needs_overwrite(example):
    before = example.read_bytes()
    proc = run_cli(str(example), "--target-flops", "0.5", "-o", str(example))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert example.read_bytes() == before
    proc = run_cli(str(example), "--target-flops", "0.5", "-o", str(example), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert example.read_bytes() != before


def test_missing_target_and_output(example):
    assert run_cli(str(example), "-o", "x.onnx").returncode == 2
    assert run_cli(str(example), "--target-flops", "0.4").returncode == 2
