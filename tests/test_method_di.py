"""DI: the discriminative channel of a hand-made two-class feature set is kept; ONNX path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphprune.passes.channels import ChannelSpace, Slice
from graphprune.passes.di import (channel_di_loss, di_greedy_plan, discriminant_information, leave_one_out_di,
                                  scatter, _ridge)


def two_class(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 4 channels, 1 dim): channel 2 carries the class (means -1/+1), the rest is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    f = rng.normal(size=(n, 4, 1))
    f[:, 2, 0] += np.where(y == 1, 1.5, -1.5)
    f[:, 0, 0] *= 3.0  # a loud but useless channel
    return f, y


def test_discriminative_channel_has_largest_di_loss() -> None:
    f, y = two_class()
    loss = channel_di_loss(f, y)
    assert int(np.argmax(loss)) == 2
    assert loss[2] > 10 * max(loss[0], loss[1], loss[3])
    assert (loss >= -1e-12).all()  # non-decreasing property: removing dims never adds DI


def test_leave_one_out_matches_direct() -> None:
    f, y = two_class(200, 1)
    x = f.reshape(len(f), -1)
    s, sb = scatter(x, y)
    r = _ridge(s, 1e-2)
    full, loo = leave_one_out_di(s, sb, [np.array([i]) for i in range(4)], r)
    assert full == pytest.approx(discriminant_information(x, y))
    for i in range(4):
        keep = [j for j in range(4) if j != i]
        a = np.linalg.inv(s[np.ix_(keep, keep)] + r * np.eye(3))
        assert loo[i] == pytest.approx(float(np.sum(a * sb[np.ix_(keep, keep)])))


def test_greedy_keeps_the_discriminative_channel() -> None:
    f, y = two_class()
    slices = {c: [Slice("w", 0, (c,), "out")] for c in range(4)}
    space = ChannelSpace([0, 1, 2, 3], [[0, 1, 2, 3]], slices, {"t": np.arange(4)},
                         {"macs": [(100.0, ("t",))], "params": [(100.0, ("t",))]})
    plan = di_greedy_plan(space, {"t": f}, y, target=0.25)
    assert plan == frozenset({0, 1, 3})


def test_di_on_onnx_model(tmp_path) -> None:
    """Feature maps through onnxruntime; the plan is applied by graphprune.prune on the ONNX file."""
    import graphprune
    from graphprune.passes.channels import from_analysis
    from graphprune.passes.di import onnx_features

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 2)).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(m, torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "n"}})
    an = graphprune.analyze(str(path))
    space = from_analysis(an)
    x = np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = (x.mean((1, 2, 3)) > 0).astype(int)
    feats = onnx_features(str(path), an, x)
    assert feats and all(v.shape[0] == 64 for v in feats.values())
    plan = di_greedy_plan(space, feats, y, target=0.5)
    assert an.macs(plan) <= 0.5 * an.macs() + 1e-6
    res = graphprune.prune(str(path), removed=plan)
    assert res.plan.cost <= 0.5 * an.macs() + 1e-6


def _cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "graphprune.cli", *args], capture_output=True, text=True)


def test_di_cli_on_static_batch_model(tmp_path) -> None:
    """A model exported with batch 1 gets its calibration samples one at a time (was: 'Got 64, expected 1')."""
    import onnx

    from random_cnn import random_cnn

    m = random_cnn(5, ["conv", "residual", "conv", "se", "conv"])
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    path, out, calib = tmp_path / "m.onnx", tmp_path / "slim.onnx", tmp_path / "calib.npz"
    onnx.save(m, path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, 8, 8)).astype(np.float32)
    np.savez(calib, x=x, y=(x[:, 0].mean((1, 2)) > 0).astype(np.int64))
    proc = _cli(str(path), "--target-flops", "0.6", "--method", "di", "--calib", str(calib), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout)["macs"]["ratio"] <= 0.6 + 1e-9
    # truly bad data: one line on stderr, exit 2, no output written
    np.savez(calib, x=x[:, :, :4, :4], y=np.arange(64) % 2)
    bad_out = tmp_path / "bad.onnx"
    proc = _cli(str(path), "--target-flops", "0.6", "--method", "di", "--calib", str(calib), "-o", str(bad_out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "calibration input" in proc.stderr
    assert not bad_out.exists()


def test_streamed_statistics_give_the_in_memory_plan() -> None:
    """Statistics folded batch by batch (scatter mode once samples outnumber dims) plan like the
    in-memory features; frozen layer outputs (the logits) are never captured."""
    import graphprune
    from graphprune.examples import example_cnn
    from graphprune.passes.channels import from_analysis
    from graphprune.passes.di import di_search, feature_maps, onnx_feature_stats, onnx_features

    m = example_cnn(image=16)
    an = graphprune.analyze(m)
    space = from_analysis(an)
    x = np.random.default_rng(0).normal(size=(200, 3, 16, 16)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 3, 200)
    stats = onnx_feature_stats(m, an, x, y, space.classes, batch_size=7)
    assert "logits" not in stats and "logits" not in feature_maps(an, space.classes)
    assert any(st.gram is not None for st in stats.values()) and any(st.rows is not None for st in stats.values())
    streamed = di_search(space, stats, 0.5)
    in_memory = di_greedy_plan(space, {t: v for t, v in onnx_features(m, an, x).items() if t in stats}, y, 0.5)
    assert streamed == in_memory
