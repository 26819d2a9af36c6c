"""A pruned module is a normal nn.Module: it trains, saves/loads, exports to ONNX; iterative and Taylor modes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

torchvision = pytest.importorskip("torchvision")

import graphprune
from graphprune.torch_prune import prune_iterative
from zoo import make_model


def _batch(n: int = 4, size: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.fixture(scope="module")
def pruned_resnet18():
    model = make_model("resnet18")
    x, _ = _batch()
    return model, graphprune.prune(model, x[:1], target_flops=0.4)


def test_real_smaller_layers(pruned_resnet18):
    model, result = pruned_resnet18
    slim = result.model
    assert type(slim) is type(model)
    conv = slim.layer1[0].conv1
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == conv.weight.shape[0] < 64
    assert slim.layer1[0].bn1.num_features == conv.out_channels
    assert slim.fc.in_features == slim.fc.weight.shape[1]
    # the original is untouched (inplace=False)
    assert model.layer1[0].conv1.out_channels == 64


def test_pruned_resnet18_trains_one_step(pruned_resnet18):
    _, result = pruned_resnet18
    slim = result.model
    slim.train()
    x, y = _batch()
    opt = torch.optim.SGD(slim.parameters(), lr=0.01)
    loss0 = F.cross_entropy(slim(x), y)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = F.cross_entropy(slim(x), y)
    assert loss1.item() < loss0.item()


def test_save_load_and_onnx_export(pruned_resnet18, tmp_path):
    _, result = pruned_resnet18
    slim = result.model.eval()
    x, _ = _batch(2)
    path = tmp_path / "slim.pt"
    result.save(path)
    loaded = graphprune.load(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))
    onnx_path = tmp_path / "slim.onnx"
    torch.onnx.export(loaded, (x[:1],), str(onnx_path), dynamo=False, opset_version=17)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x[:1].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, slim(x[:1]).numpy(), atol=1e-4, rtol=1e-4)
    # the ONNX of the pruned module has the pruned FLOPs
    again = graphprune.analyze(str(onnx_path))
    assert again.macs() == pytest.approx(result.analysis.macs(result.plan.removed), rel=0.01)


def test_graphmodule_result_saves_and_exports(tmp_path):
    """ShuffleNet's channel shuffle becomes index_select in an fx GraphModule."""
    model = make_model("shufflenet_v2_x0_5")
    x, _ = _batch(2)
    result = graphprune.prune(model, x, target_flops=0.5)
    assert isinstance(result.model, torch.fx.GraphModule)
    graphprune.save(result.model, tmp_path / "s.pt")
    loaded = graphprune.load(tmp_path / "s.pt").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model.eval()(x))
    torch.onnx.export(loaded, (x,), str(tmp_path / "s.onnx"), dynamo=False, opset_version=17)


def test_inplace_prunes_the_given_module():
    model = make_model("resnet18")
    x, _ = _batch(1)
    result = graphprune.prune(model, x, target_flops=0.5, inplace=True)
    assert result.model is model
    assert model.layer1[0].conv1.out_channels < 64


def test_iterative_with_finetune_callback():
    model = make_model("resnet18")
    x, y = _batch()
    seen = []

    def finetune(step, m):
        seen.append(step)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.001)
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    result = prune_iterative(model, x[:1], 0.4, steps=3, callback=finetune)
    assert seen == [1, 2, 3]
    ratio = result.report["iterative"]["macs_ratio"]
    assert 0.39 <= ratio <= 0.4 + 1e-9
    with torch.no_grad():
        assert result.model.eval()(x).shape == (4, 1000)


def test_taylor_scores_from_batches():
    model = make_model("resnet18")
    x, y = _batch()
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    result = graphprune.prune(model, x[:1], target_flops=0.5, method="taylor", batches=batches, loss_fn=loss_fn)
    assert abs(result.report["achieved"] - 0.5) <= 0.005
    assert not any(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert result.model.eval()(x).shape == (4, 1000)


def test_functional_ops_and_layer_norm():
    """torch.split / view / slicing / LayerNorm in a hand-written module."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, padding=1)
            self.bn = nn.BatchNorm2d(32)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 24, 1)
            self.dw = nn.Conv2d(40, 40, 3, padding=1, groups=40)
            self.ln = nn.GroupNorm(4, 40)
            self.head = nn.Linear(40 * 4 * 4, 10)

        def forward(self, x):
            x = F.relu(self.bn(self.stem(x)))
            p, q = torch.split(x, [16, 16], dim=1)
            x = torch.cat([self.a(p), self.b(q)], dim=1)
            x = self.ln(self.dw(x))
            x = F.adaptive_avg_pool2d(x, 4)
            return self.head(x.view(x.size(0), 40 * 4 * 4))

    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    result = graphprune.prune(model, x, target_flops=0.7)
    frozen = [r for r in result.report["groups"] if r["frozen"]]
    assert any("GroupNormalization" in (r["reason"] or "") for r in frozen)
    with torch.no_grad():
        assert result.model.eval()(x).shape == (2, 10)
    assert result.model.stem.out_channels < 32
