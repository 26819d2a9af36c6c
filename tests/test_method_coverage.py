"""Issue 22: data-driven methods on channels-last blocks, and methods that say which groups they
could not score (bn_scale -> l1 fallback in the table and JSON; --strict-method makes it exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.passes.channels import channel_axis, from_analysis
from graphprune.passes.di import feature_maps, onnx_feature_stats


class ChannelsLast(nn.Module):
    """conv+BN, then a token MLP on (N, HW, C) tensors (channels last, like an SVTR neck), then conv+InstanceNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(12, affine=True)  # survives export (a BatchNorm is folded)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        n, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        t = t + self.fc2(F.relu(self.fc1(t)))
        h = t.transpose(1, 2).reshape(n, c, hh, ww)
        return self.head(F.relu(self.norm2(self.conv2(h))).mean((2, 3)))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    m = ChannelsLast().eval()
    with torch.no_grad():  # distinct scales, so bn_scale has something to rank
        m.norm2.weight.uniform_(0.2, 1.5)
    path = str(tmp_path_factory.mktemp("cl") / "cl.onnx")
    torch.onnx.export(m, torch.zeros(1, 3, 8, 8), path, input_names=["x"], dynamo=False)  # static batch 1
    return path


def _calib(n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32) + y[:, None, None, None].astype(np.float32)
    return x, y


def test_di_reads_channels_last_features_on_their_axis(model_path: str) -> None:
    an = graphprune.analyze(model_path)
    space = from_analysis(an)
    maps = feature_maps(an, space.classes)
    token = [t for t in maps if channel_axis(an, t) == 2]
    assert token, "the fc1 output (1, 64, 16) carries its channels last"
    assert all(t not in maps for t in an.graph.outputs)  # frozen outputs are never captured
    x, y = _calib()
    stats = onnx_feature_stats(model_path, an, x, y, space.classes)
    st = stats[token[0]]
    assert (st.channels, st.q, st.n) == (16, 4, 48)  # 16 channels, 64 tokens pooled to 4 positions
    res = graphprune.prune(model_path, target_flops=0.7, method="di", calib=(x, y))
    assert res.plan.cost <= 0.7 * an.macs() * (1 + 1e-9)
    cov = res.report["method_coverage"]
    assert cov["method"] == "di" and not cov["fallbacks"] and cov["scored_groups"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *args], capture_output=True, text=True)


def test_bn_scale_fallback_is_reported_and_strict_fails(model_path: str, tmp_path) -> None:
    an = graphprune.analyze(model_path)
    fc_group = next(g.id for g in an.prunable_groups if len(g.classes) == 16)
    bn_group = next(g.id for g in an.prunable_groups if len(g.classes) == 12)
    res = graphprune.prune(model_path, target_flops=0.8, method="bn_scale")
    cov = res.report["method_coverage"]
    # only the InstanceNorm group has a norm scale (the exporter folds BatchNorm into conv1)
    no_norm = sorted(g.id for g in an.prunable_groups if g.id != bn_group)
    assert fc_group in no_norm
    assert cov["scored_groups"] == [bn_group]
    assert cov["fallbacks"] == [{"to": "l1", "why": cov["fallbacks"][0]["why"], "groups": no_norm}]
    by = {r["id"]: r["scored_by"] for r in res.report["groups"]}
    assert by[fc_group] == "l1" and by[bn_group] == "bn_scale"

    out = tmp_path / "slim.onnx"
    proc = _cli(model_path, "--target-flops", "0.8", "--method", "bn_scale", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["method_coverage"]["fallbacks"][0]["groups"] == no_norm
    proc = _cli(model_path, "--target-flops", "0.8", "--method", "bn_scale", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(no_norm)} fell back to l1" in " ".join(proc.stdout.split())

    strict_out = tmp_path / "strict.onnx"
    proc = _cli(model_path, "--target-flops", "0.8", "--method", "bn_scale", "--strict-method", "-o", str(strict_out))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and f"cannot score {len(no_norm)} of {len(no_norm) + 1} prunable groups" in proc.stderr
    assert not strict_out.exists()
    proc = _cli(model_path, "--target-flops", "0.8", "--method", "l1", "--strict-method", "--dry-run")
    assert proc.returncode == 0, proc.stderr
