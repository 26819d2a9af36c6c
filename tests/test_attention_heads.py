"""Issue 13: attention heads prune as wholes in the ONNX path.

A head's q, k and v columns of the qkv projection and its rows of the output projection form one
channel class (q.k ties the dims of a head together; heads are independent batch slices of the
two attention products). The oracle here is independent of graphprune's masking: the torch
module with the removed heads' output-projection inputs zeroed.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphprune
from graphprune.analysis.groups import analyze_graph
from graphprune.frontends.onnx_frontend import load_onnx
from independent_macs import count_macs

DIM, HEADS = 32, 4
HEAD_DIM = DIM // HEADS


class Block(nn.Module):
    """Pre-norm attention + MLP block; `style` picks how q/k/v are taken apart (the exporters'
    spellings: Gather for qkv[0], Split+Squeeze for unbind, Slice+Squeeze as Paddle2ONNX writes)."""

    def __init__(self, heads: int = HEADS, style: str = "index") -> None:
        super().__init__()
        self.heads, self.style = heads, style
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 64), nn.Linear(64, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.style == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        elif self.style == "unbind":
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (qkv[i:i + 1].squeeze(0) for i in range(3))
        att = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.relu(self.fc1(x)))


def export(tmp_path, **kw):
    torch.manual_seed(0)
    model = Block(**kw).eval()
    path = tmp_path / "block.onnx"
    torch.onnx.export(model, (torch.randn(1, 10, DIM),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return model, path


def _head_classes(analysis) -> list[int]:
    """Class of each head, read off the qkv output columns (q part); asserts q/k/v of a head share it."""
    qkv = next(t for t in analysis.roots if t.startswith("/qkv/") and analysis.channels(t) == 3 * DIM)
    roots = analysis.roots[qkv]
    classes = [int(roots[h * HEAD_DIM]) for h in range(HEADS)]
    for part in range(3):
        for h in range(HEADS):
            cols = roots[part * DIM + h * HEAD_DIM: part * DIM + (h + 1) * HEAD_DIM]
            assert (cols == classes[h]).all(), (part, h)
    return classes


@pytest.mark.parametrize("style", ["index", "unbind", "slice"])
def test_whole_heads_prune_and_equal_the_masked_module(tmp_path, style):
    model, path = export(tmp_path, style=style)
    analysis = analyze_graph(load_onnx(str(path)).graph)
    classes = _head_classes(analysis)
    group = analysis.groups[analysis.group_of[classes[0]]]
    assert not group.frozen and sorted(group.classes) == sorted(classes)  # heads, not single dims
    res = graphprune.prune(str(path), removed={classes[1], classes[3]})
    assert "equals masked original" in res.report["validation"]

    x = np.random.default_rng(1).standard_normal((1, 10, DIM)).astype(np.float32)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for h in (1, 3):
            masked.proj.weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
        want = masked(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

    shapes = sorted(tuple(t.dims) for t in res.model.graph.initializer if len(t.dims) == 2)
    kept = DIM - 2 * HEAD_DIM
    assert (DIM, 3 * kept) in shapes and (kept, DIM) in shapes  # qkv lost 2 heads' q/k/v, proj their rows
    reshape_targets = [onnx.numpy_helper.to_array(t).tolist() for t in res.model.graph.initializer
                       if t.data_type == onnx.TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] == 5]
    assert any(t[2:] == [3, HEADS - 2, HEAD_DIM] for t in reshape_targets), reshape_targets


def test_head_pruning_meets_a_flops_target_counted_independently(tmp_path):
    _, path = export(tmp_path, style="index")
    res = graphprune.prune(str(path), target_flops=0.6)
    analysis = res.analysis
    removed_heads = set(_head_classes(analysis)) & set(res.plan.removed)
    assert removed_heads, "the target should be met partly by removing heads"
    feed = {"x": np.zeros((1, 10, DIM), np.float32)}
    ratio = count_macs(res.model, feed) / count_macs(onnx.load(str(path)), feed)
    assert abs(res.report["achieved"] - ratio) <= 0.005, (res.report["achieved"], ratio)


def test_single_head_attention_stays_frozen(tmp_path):
    """With one head there is no head axis: q.k would lose dims, so the qkv columns are kept."""
    _, path = export(tmp_path, heads=1)
    analysis = analyze_graph(load_onnx(str(path)).graph)
    qkv = next(t for t in analysis.roots if t.startswith("/qkv/") and analysis.channels(t) == 3 * DIM)
    assert all(analysis.is_frozen(int(r)) for r in analysis.roots[qkv])
    res = graphprune.prune(str(path), target_flops=0.8)  # the MLP still prunes
    assert res.report["achieved"] <= 0.8
