"""PyTorch-path coverage on real model code: functional calls on a module's own parameters
(F.conv2d / F.batch_norm / F.linear / F.layer_norm / F.group_norm, timm's BatchNormAct2d), the
torch.export fallback (Ultralytics YOLO), and attention MACs (SDPA, nn.MultiheadAttention).

Oracle everywhere: the pruned module equals the original with the removed channels' consumers
zeroed, and pruning really changed the function (BN statistics are randomised first, so the
freshly initialised models are not near-constant)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphprune
from graphprune.rewrite.torch_rewrite import mask_consumers_module


def _flat(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-like BN/GN affine parameters and statistics (fresh inits are identity maps, and timm
    zero-initialises some gammas, which would make 'pruning changed nothing' pass vacuously)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def assert_prunes_exactly(model: nn.Module, x: torch.Tensor, target: float = 0.4,
                          tol: float = 0.005) -> graphprune.PruneResult:
    """Prune to `target` FLOPs (within `tol`: tiny nets have coarse steps) and check the masking oracle.

    round_to=1: op coverage is under test here; hardware multiples would make these tiny nets' steps coarser."""
    result = graphprune.prune(model, x, target_flops=target, method="l1", round_to=1)
    assert abs(result.report["achieved"] - target) <= tol, result.report["achieved"]
    masked = mask_consumers_module(model, result.analysis, result.plan.removed).eval()
    with torch.no_grad():
        original, ref, pruned = _flat(model(x)), _flat(masked(x)), _flat(result.model(x))
    assert [p.shape for p in pruned] == [o.shape for o in original]
    scale = max(o.abs().max().item() for o in original)
    diff = max((p - r).abs().max().item() for p, r in zip(pruned, ref))
    assert diff <= 1e-4 * max(scale, 1.0), diff
    changed = max((p - o).abs().max().item() for p, o in zip(pruned, original))
    assert changed > 1e-3 * scale, "pruning did not change the function: the oracle would be vacuous"
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    return result


def _x(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------
# functional calls on own parameters, hand-written (fast, no timm needed)
# ---------------------------------------------------------------------------------------------
class FunctionalNet(nn.Module):
    """Layers that hold parameters but call torch.nn.functional on them, as timm's BatchNormAct2d does."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(16) * 0.1)
        self.bn_w, self.bn_b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16) * 0.1)
        self.register_buffer("bn_mean", torch.randn(16) * 0.1)
        self.register_buffer("bn_var", torch.rand(16) + 0.5)
        self.dw = nn.Parameter(torch.randn(16, 1, 3, 3) * 0.3)  # depthwise through F.conv2d(groups=16)
        self.w2 = nn.Parameter(torch.randn(24, 16, 1, 1) * 0.3)
        self.gn_w, self.gn_b = nn.Parameter(torch.rand(24) + 0.5), nn.Parameter(torch.randn(24) * 0.1)
        self.fc1 = nn.Parameter(torch.randn(32, 24) * 0.3)
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(32) + 0.5), nn.Parameter(torch.randn(32) * 0.1)
        self.fc2 = nn.Parameter(torch.randn(10, 32) * 0.3)
        self.fc2_b = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.w1, self.b1, padding=1)
        x = F.relu(F.batch_norm(x, self.bn_mean, self.bn_var, self.bn_w, self.bn_b, False, 0.1, 1e-5))
        x = F.conv2d(x, self.dw, None, 1, 1, 1, 16)
        x = F.conv2d(x, self.w2)
        x = F.group_norm(x, 24, self.gn_w, self.gn_b)
        x = F.relu(x).mean((2, 3))  # (the mean of a normalised map alone is its bias)
        x = F.gelu(F.linear(x, self.fc1))
        x = F.layer_norm(x.unsqueeze(1), (32,), self.ln_w, self.ln_b).squeeze(1)
        return F.linear(x, self.fc2, self.fc2_b)


def test_functional_calls_on_own_parameters_are_pruned():
    model = FunctionalNet().eval()
    analysis = graphprune.analyze(model, _x(16))
    ops = {n.op_type for n in analysis.graph.nodes}
    assert {"Conv", "BatchNormalization", "GroupNormalization", "Gemm"} <= ops
    assert not [n for n in analysis.graph.nodes if n.domain == "torch"]
    # the conv/BN/depthwise stream and fc1 are prunable; fc1's output feeds a LayerNorm over it
    result = assert_prunes_exactly(model, _x(16), target=0.6, tol=0.05)
    assert result.report["frontend"] == "torch.fx"
    sizes = {n: tuple(p.shape) for n, p in result.model.named_parameters()}
    assert sizes["w1"][0] < 16 and sizes["dw"][0] == sizes["w1"][0] and sizes["bn_w"][0] == sizes["w1"][0]


# ---------------------------------------------------------------------------------------------
# torch.export fallback
# ---------------------------------------------------------------------------------------------
class Untraceable(nn.Module):
    """Iterates over a chunk() result (torch.fx cannot: 'Proxy object cannot be iterated'), like C2f."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU())
        self.m = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
                               for _ in range(2))
        self.head = nn.Conv2d(24, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.stem(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.head(torch.cat(y[1:], 1))


def test_torch_export_fallback_when_fx_cannot_trace():
    with pytest.raises(Exception, match="cannot be iterated"):
        torch.fx.symbolic_trace(Untraceable())
    model = _randomise_norms(Untraceable())
    result = assert_prunes_exactly(model, _x(16), target=0.5, tol=0.05)
    assert result.report["frontend"] == "torch.export"
    assert "cannot be iterated" in result.report["frontend_fallback_reason"]
    with torch.no_grad():  # the user's module is untouched (export runs on a copy)
        model(_x(16))


def test_sensitivity_and_di_run_on_a_torch_export_fallback():
    """Modules from torch.export refuse .eval(): the strategies that run the traced module set the
    training flags instead (this used to fail inside the sensitivity runner)."""
    model = _randomise_norms(Untraceable())
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    res = graphprune.prune(model, _x(16), target_flops=0.7, strategy="sensitivity", calib=calib.numpy())
    assert res.report["frontend"] == "torch.export" and "sensitivity" in res.report
    assert res.report["achieved"] <= 0.7 + 1e-9
    labels = (calib[:, 0].mean((1, 2)) > 0).long().numpy()
    res = graphprune.prune(model, _x(16), target_flops=0.7, method="di", calib=(calib.numpy(), labels))
    assert res.report["frontend"] == "torch.export" and res.report["achieved"] <= 0.7 + 1e-9


def test_capture_failure_is_one_graphprune_error():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else self.conv(-x)

    with pytest.raises(graphprune.GraphpruneError, match="torch.fx: .*torch.export"):
        graphprune.prune(DataDependent(), _x(8), target_flops=0.5)


# ---------------------------------------------------------------------------------------------
# attention MACs on the PyTorch path
# ---------------------------------------------------------------------------------------------
class MHANet(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.batch_first = batch_first
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attn(h, h, h)
        return self.out(a)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_macs_counted_and_agree_with_onnx(batch_first, tmp_path):
    model = MHANet(batch_first).eval()
    n, length, e = 2, 7, 32
    x = torch.randn((n, length, 12) if batch_first else (length, n, 12))
    analysis = graphprune.analyze(model, x)
    mha = [t for t in analysis.mac_terms if t.node == "attn"]
    expected = n * (4 * length * e * e + 2 * length * length * e)  # q/k/v/out projections + 2 products
    assert [t.base for t in mha] == [expected]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "mha.onnx"), dynamo=False, opset_version=17)
    via_onnx = graphprune.analyze(str(tmp_path / "mha.onnx"))
    assert analysis.macs() == pytest.approx(via_onnx.macs(), rel=0.005)
    # the projection in front of the attention is still prunable? no: MHA keeps its width whole
    assert analysis.is_frozen(int(analysis.ctx.space("attn:0").ids[0]))


class SDPANet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.out(a.transpose(1, 2).reshape(b, n, 16))


def test_sdpa_counts_both_attention_products():
    x = torch.randn(2, 9, 16)
    analysis = graphprune.analyze(SDPANet().eval(), x)
    by_node = {t.node: t.base for t in analysis.mac_terms}
    b, h, n, d = 2, 2, 9, 8
    attention = sorted(v for k, v in by_node.items() if "scaled_dot_product_attention" in k)
    assert attention == [b * h * n * n * d] * 2  # q @ k^T and attn @ v


@pytest.mark.slow
def test_vit_tiny_macs_agree_between_paths(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    via_torch = graphprune.analyze(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "vit.onnx"), dynamo=False, opset_version=17)
    via_onnx = graphprune.analyze(str(tmp_path / "vit.onnx"))
    assert via_torch.macs() == pytest.approx(via_onnx.macs(), rel=0.005)
    ops = {n.name: n.op_type for n in via_torch.graph.nodes}
    attention = sum(t.base for t in via_torch.mac_terms if ops[t.node] == "MatMul")
    assert attention > 0.1 * via_torch.macs()  # the 12 blocks' q@k^T and attn@v: ~14% of ViT-Tiny


# ---------------------------------------------------------------------------------------------
# real models from their own code (no downloads)
# ---------------------------------------------------------------------------------------------
TIMM_FAST = ["lcnet_050", "mobilenetv3_small_050", "regnetx_002"]
TIMM_SLOW = ["efficientnet_b0", "efficientnetv2_rw_t", "regnety_002", "resnext26ts", "mobilenetv4_conv_small",
             "mnasnet_small", "fbnetc_100", "tinynet_e", "mixnet_s", "hardcorenas_a"]


@pytest.mark.parametrize("name", TIMM_FAST + [pytest.param(n, marks=pytest.mark.slow) for n in TIMM_SLOW])
def test_timm_prunes_to_40_percent(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = _randomise_norms(timm.create_model(name, pretrained=False))
    result = assert_prunes_exactly(model, _x(64))
    assert result.report["frontend"] == "torch.fx"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n", "yolo11n"])
def test_ultralytics_yolo_prunes_through_torch_export(name):
    pytest.importorskip("ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = _randomise_norms(DetectionModel(f"{name}.yaml", verbose=False))
    result = assert_prunes_exactly(model, _x(64))
    assert result.report["frontend"] == "torch.export"
