"""HFP, SSR/AULM and HBFP on ONNX models without labels (issue 16): the trainable ONNX module exposes per-node
layers and ONNX-named parameters, each method trains on the distillation loss alone and returns a plan that
meets the FLOPs target exactly, and what each method promises holds on the ONNX graph (gates at 1 are the
original, folded gates equal hooked gates, SSR/HBFP's removed channels are exactly zero so cutting them
changes nothing)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import graphprune
from graphprune.distill_methods import train_plan
from graphprune.frontends.onnx_torch import NodeLayer, OnnxModule
from graphprune.passes.channels import from_analysis, param_dict
from graphprune.passes.hfp import Gates
from graphprune.rewrite.validate import run_onnx
from test_finetune import _data, _init, tiny_cnn

torch.set_num_threads(1)
SHAPE = {"x": (1, 3, 12, 12)}


def seq_mlp(seed: int = 0, t: int = 5, d: int = 6, h: int = 12, classes: int = 7) -> onnx.ModelProto:
    """A sequence head as in PP-OCR rec: MatMul + bias, Relu, MatMul + bias, Softmax over the last axis;
    the hidden width (the channel axis is the last one, MatMul weights are (in, out)) is prunable."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(0, 0.5, s).astype(np.float32)  # noqa: E731
    inits = [_init("wa", f(d, h)), _init("ba", f(h)), _init("wb", f(h, classes)), _init("bb", f(classes))]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["ha"]), helper.make_node("Add", ["ha", "ba"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]), helper.make_node("MatMul", ["hr", "wb"], ["lo"]),
        helper.make_node("Add", ["lo", "bb"], ["logit"]), helper.make_node("Softmax", ["logit"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", t, d])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", t, classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _space(model: onnx.ModelProto, shape: dict) -> tuple[OnnxModule, object]:
    module = OnnxModule(model)
    return module, from_analysis(graphprune.analyze(model, input_shape=shape), module)


def _run(module: OnnxModule, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x))[0].numpy()


def test_module_exposes_layers_and_onnx_named_weights():
    model = tiny_cnn()
    module, space = _space(model, SHAPE)
    weights = param_dict(module)
    assert set(weights) == {"w1", "b1", "g1", "be1", "w2", "b2", "wf", "bf"}  # BN statistics are not weights
    conv = module.get_submodule(module.module_of("w1"))
    assert isinstance(conv, NodeLayer) and conv.weight is weights["w1"] and conv.bias is weights["b1"]
    assert {id(p) for p in module.parameters()} == {id(p) for p in weights.values()}  # one parameter per initializer
    # gate points: after the BatchNorm, the second conv, the classifier (what an nn.Module would give)
    assert [(g.module, g.tensor) for g in space.gates] == [
        (module.module_of("g1"), "n1"), (module.module_of("w2"), "c2"), (module.module_of("wf"), "logits")]
    x = _data(4)
    seen = []
    handle = conv.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    ref = _run(module, x)
    handle.remove()
    assert seen == [(4, 16, 12, 12)]
    assert np.abs(ref - run_onnx(model, {"x": x})[0]).max() < 1e-5
    # every slice the analysis binds to a weight names a real parameter of the right size
    for c in space.classes:
        for s in space.slices[c]:
            if s.param in weights:
                assert max(s.index) < weights[s.param].shape[s.axis]


@pytest.mark.parametrize("make,shape,xs", [
    (tiny_cnn, SHAPE, lambda: _data(4)),
    (seq_mlp, {"x": (1, 5, 6)}, lambda: np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32)),
])
def test_hfp_gates_at_one_are_the_original_and_fold_equals_hooks(make, shape, xs):
    model = make()
    module, space = _space(model, shape)
    assert space.gates
    x = xs()
    ref = _run(module, x)
    gates = Gates(module, space, init=2.0)  # equal logits: every gate is exactly 1 after the group scaling
    assert torch.equal(gates.values(), torch.ones(len(space.classes)))
    assert np.array_equal(_run(module, x), ref)
    with torch.no_grad():
        gates.theta.copy_(torch.linspace(-2.0, 3.0, len(space.classes)))
    hooked = _run(module, x)
    assert np.abs(hooked - ref).max() > 1e-3  # the gates do act
    gates.fold(module)  # gate values multiplied into the layers' weights (MatMul: along its last axis)
    assert np.abs(_run(module, x) - hooked).max() < 1e-5


def _exact_target(space, removed, target: float) -> None:
    """Within the target, and no removed class could be given back without breaking it."""
    assert space.ratio("macs", removed) <= target * (1 + 1e-9)
    for c in removed:
        assert space.ratio("macs", set(removed) - {c}) > target * (1 + 1e-9)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dm")
    path = d / "m.onnx"
    onnx.save(tiny_cnn(), path)
    before = path.read_bytes()
    x = _data(112)
    out = {m: train_plan(str(path), x, m, 0.5, input_shape=SHAPE, steps=24, epoch_steps=4, batch_size=16, seed=0)
           for m in ("hfp", "ssr", "hbfp")}
    assert path.read_bytes() == before  # the input file is never modified
    return out, x


@pytest.mark.parametrize("method", ["hfp", "ssr", "hbfp"])
def test_method_runs_label_free_on_onnx_and_meets_the_target(runs, method):
    out, x = runs
    tp = out[method]
    model = tiny_cnn()
    assert tp.steps == 24 and tp.method == method
    # the result is the original graph with the method's weights: names, opset, metadata unchanged
    assert [n.name for n in tp.model.graph.initializer] == [n.name for n in model.graph.initializer]
    assert [n.op_type for n in tp.model.graph.node] == [n.op_type for n in model.graph.node]
    assert dict((p.key, p.value) for p in tp.model.metadata_props) == {"owner": "test"}
    moved = max(float(np.abs(onnx.numpy_helper.to_array(a) - onnx.numpy_helper.to_array(b)).max())
                for a, b in zip(tp.model.graph.initializer, model.graph.initializer))
    assert moved > 1e-4  # it trained
    space = from_analysis(graphprune.analyze(tp.model, input_shape=SHAPE))
    if method == "hbfp":  # one member of each closest pair: within the target, at most one pair below it
        assert space.ratio("macs", tp.removed) <= 0.5 * (1 + 1e-9)
    else:
        _exact_target(space, tp.removed, 0.5)
    assert tp.flops == pytest.approx(space.ratio("macs", tp.removed))
    # the usual pipeline cuts the plan; its count agrees with the method's
    res = graphprune.prune(tp.model, removed=tp.removed, measure=False)
    assert res.plan.achieved == pytest.approx(tp.flops)
    if method in ("ssr", "hbfp"):
        # the method left the removed channels exactly zero, so cutting them changes no output
        got = run_onnx(res.model, {"x": x[:8]})[0]
        ref = run_onnx(tp.model, {"x": x[:8]})[0]
        assert np.abs(got - ref).max() < 1e-4


def test_methods_train_on_the_distillation_loss_only(monkeypatch):
    import graphprune.distill as distill

    calls = []
    real = distill.outputs_loss

    def spy(losses, *args, **kw):
        calls.append([e.kind for e in losses])
        return real(losses, *args, **kw)

    monkeypatch.setattr(distill, "outputs_loss", spy)
    x = np.random.default_rng(3).normal(size=(40, 5, 6)).astype(np.float32)
    tp = train_plan(seq_mlp(), x, "hfp", 0.6, input_shape={"x": (1, 5, 6)}, steps=6, epoch_steps=2, batch_size=8)
    assert len(calls) == 6 and all(k == ["kl"] for k in calls)  # the Softmax output, compared on its logits
    space = from_analysis(graphprune.analyze(tp.model, input_shape={"x": (1, 5, 6)}))
    _exact_target(space, tp.removed, 0.6)


def test_bad_requests_fail_in_one_line():
    x = _data(32)
    with pytest.raises(graphprune.GraphpruneError, match="unknown training-based method"):
        train_plan(tiny_cnn(), x, "l1", 0.5)
    with pytest.raises(graphprune.GraphpruneError, match="target_flops"):
        train_plan(tiny_cnn(), x, "hfp", 1.5)
    with pytest.raises(graphprune.GraphpruneError):
        train_plan(tiny_cnn(), _data(32, hw=9)[:, :2], "ssr", 0.5)  # data of the wrong shape
