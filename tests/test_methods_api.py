"""The paper methods through the public API and the CLI: DI as a plan search, training methods' errors."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.validate import random_feed, run_onnx

torch = pytest.importorskip("torch")


def _calib(n=96, side=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, side, side)).astype(np.float32)
    y = (x[:, 0].mean((1, 2)) > 0).astype(np.int64)
    return x, y


def test_di_on_onnx_through_prune_is_exact():
    model = example_cnn(image=16)
    x, y = _calib()
    result = graphprune.prune(model, target_flops=0.5, method="di", calib=(x, y))
    assert result.plan.achieved <= 0.5 + 1e-9
    assert result.report["method"] == "di"
    loaded = load_onnx(model)
    feed = random_feed(loaded.proto, loaded.graph, seed=1)
    masked = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    np.testing.assert_allclose(run_onnx(result.model, feed)[0], masked, atol=1e-4)


def test_di_on_module_through_prune():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(24, 2)).eval()
    x, y = _calib()
    result = graphprune.prune(net, torch.zeros(1, 3, 16, 16), target_flops=0.5, method="di", calib=(x, y))
    assert result.plan.achieved <= 0.5 + 1e-9
    assert result.model(torch.as_tensor(x[:4])).shape == (4, 2)


def test_di_without_calibration_is_a_clear_error():
    with pytest.raises(graphprune.GraphpruneError, match="calibration"):
        graphprune.prune(example_cnn(image=16), target_flops=0.5, method="di")


@pytest.mark.parametrize("method", ["hfp", "ssr", "hbfp"])
def test_training_methods_point_to_their_pass(method):
    with pytest.raises(graphprune.GraphpruneError, match=f"graphprune.passes.{method}"):
        graphprune.prune(example_cnn(image=16), target_flops=0.5, method=method)


def test_cli_di_with_npz_and_hfp_error(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(example_cnn(image=16), src)
    x, y = _calib()
    np.savez(tmp_path / "calib.npz", x=x, y=y)
    cli = [sys.executable, "-m", "graphprune.cli"]
    ok = subprocess.run(cli + [str(src), "--target-flops", "0.5", "--method", "di", "--calib",
                               str(tmp_path / "calib.npz"), "-o", str(tmp_path / "s.onnx"), "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["macs"]["ratio"] <= 0.5
    bad = subprocess.run(cli + [str(src), "--target-flops", "0.5", "--method", "hfp", "-o", str(tmp_path / "t.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
