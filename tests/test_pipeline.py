"""The pass pipeline itself: the default pass lists, the manager's timing/progress/errors, user pass lists,
and the two hooks the recovery passes build on (capture and param_updates) on both model kinds."""
import numpy as np
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.passes.stages import Analyze, Lower, default_passes
from graphprune.pipeline import FunctionPass, PassManager, PruneOptions, PruneState
from graphprune.rewrite.validate import run_onnx

torch = pytest.importorskip("torch")


def names(options: PruneOptions) -> list[str]:
    return [p.name for p in default_passes(options)]


def test_default_pipelines_read_as_lists():
    assert names(PruneOptions("macs", 0.5)) == ["lower", "analyze", "score", "allocate", "rewrite", "validate", "report"]
    assert names(PruneOptions("latency", 0.5)) == ["lower", "analyze", "latency_cost", "score", "allocate",
                                                   "rewrite", "validate", "measure", "report"]
    assert names(PruneOptions(method="di", target_kind="macs", target=0.5))[2] == "search"
    assert names(PruneOptions(removed=frozenset({1})))[2:4] == ["explicit_plan", "rewrite"]
    # calibration data opens the recovery slot (empty until recovery passes land): nothing else changes
    assert names(PruneOptions("macs", 0.5, calibration=np.zeros((2, 3, 8, 8)))) == names(PruneOptions("macs", 0.5))


def test_report_lists_every_pass_and_times_them():
    seen = []
    result = graphprune.prune(example_cnn(image=16), target_flops=0.5, progress=seen.append)
    run = [p["name"] for p in result.report["passes"]]
    assert run == ["lower", "analyze", "score", "allocate", "rewrite", "validate", "report"]
    assert set(result.report["time"]) >= {"load_s", "analyze_s", "plan_s", "rewrite_s", "validate_s", "total_s"}
    assert result.report["time"]["total_s"] >= result.report["time"]["rewrite_s"] > 0
    assert seen[:3] == ["loading the model", "analysing channel dependencies", "scoring channels (l1)"]


def test_a_failing_pass_is_one_line_naming_it():
    def boom(state):
        raise ValueError("bad\nsecond line")

    with pytest.raises(graphprune.GraphpruneError) as info:
        graphprune.prune(example_cnn(image=16), target_flops=0.5,
                         passes=lambda default: default[:2] + [FunctionPass("boom", boom)] + default[2:])
    assert str(info.value) == "internal error in pass boom (after lower, analyze): ValueError: bad"
    assert isinstance(info.value.__cause__, ValueError)


def test_user_errors_pass_through_unchanged():
    def refuse(state):
        raise graphprune.GraphpruneError("no thanks")

    with pytest.raises(graphprune.GraphpruneError, match="^no thanks$"):
        PassManager([FunctionPass("refuse", refuse)]).run(PruneState(None, None, PruneOptions()))
    with pytest.raises(graphprune.GraphpruneError, match="not a pass"):
        PassManager([object()])


def test_user_pass_list_runs_instead_of_the_default():
    seen = {}

    def spy(state):
        seen["groups"] = len(state.analysis.groups)

    def passes(default):
        i = [p.name for p in default].index("allocate")
        return default[: i + 1] + [FunctionPass("spy", spy)] + default[i + 1:]

    result = graphprune.prune(example_cnn(image=16), target_flops=0.5, passes=passes)
    assert seen["groups"] == len(result.analysis.groups) > 0
    assert "spy" in [p["name"] for p in result.report["passes"]]
    with pytest.raises(graphprune.GraphpruneError, match="no pruned model"):
        graphprune.prune(example_cnn(image=16), target_flops=0.5, passes=[Lower(), Analyze()])


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(24, 5)).eval()


def test_module_path_takes_the_same_options_as_onnx():
    net = small_net()
    with pytest.raises(graphprune.GraphpruneError) as info:
        graphprune.prune(net, torch.zeros(1, 3, 16, 16), target_latency=0.5)
    assert "onnxruntime" in str(info.value) and "exactly one" not in str(info.value)
    # input_shape instead of example inputs; a mismatch between the two is an error, not a guess
    result = graphprune.prune(net, input_shape={"x": (1, 3, 16, 16)}, target_flops=0.5)
    assert result.model(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(graphprune.GraphpruneError, match="does not match"):
        graphprune.prune(net, torch.zeros(1, 3, 16, 16), input_shape={"x": (1, 3, 8, 8)}, target_flops=0.5)
    with pytest.raises(graphprune.GraphpruneError, match="choose from .*'di'.*'taylor'"):
        graphprune.prune(net, torch.zeros(1, 3, 16, 16), target_flops=0.5, method="nope")
    with pytest.raises(graphprune.GraphpruneError) as info:
        graphprune.prune(example_cnn(image=16), target_flops=0.5, method="nope")
    assert "'di'" in str(info.value) and "taylor" not in str(info.value)


def double_first_weight(name):
    def run(state):
        value = state.graph.constants[name]
        state.param_updates[name] = np.asarray(value) * 2.0
    return FunctionPass("recover", run)


def test_param_updates_reach_the_onnx_model_and_the_oracle():
    model = example_cnn(image=16)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = conv.input[1]
    add = lambda default: default[:4] + [double_first_weight(weight)] + default[4:]  # noqa: E731
    result = graphprune.prune(model, target_flops=0.5, passes=add)
    plain = graphprune.prune(model, target_flops=0.5)
    assert result.plan.removed == plain.plan.removed
    x = {model.graph.input[0].name: np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    got, ref, before = run_onnx(result.model, x)[0], run_onnx(result.reference(), x)[0], run_onnx(plain.model, x)[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert np.abs(got - before).max() > 1e-3  # the update really changed the pruned model


def test_param_updates_reach_the_module_and_the_oracle():
    net = small_net()
    x = torch.randn(2, 3, 16, 16)
    add = lambda default: default[:4] + [double_first_weight("0.weight")] + default[4:]  # noqa: E731
    result = graphprune.prune(net, x, target_flops=0.5, passes=add)
    plain = graphprune.prune(net, x, target_flops=0.5)
    with torch.no_grad():
        got, ref, before = result.model.eval()(x), result.reference().eval()(x), plain.model.eval()(x)
    assert (got - ref).abs().max().item() < 1e-4
    assert (got - before).abs().max().item() > 1e-3
    assert torch.equal(net[0].weight, small_net()[0].weight)  # the user's module is untouched


def capture_outputs(model, example, calib):
    """Capture the model output tensor on the calibration inputs, through a pass in the pipeline."""
    seen = {}

    def capture(state):
        seen.update(state.adapter.capture(state, list(state.graph.outputs), calib))

    graphprune.prune(model, example, target_flops=0.5,
                     passes=lambda d: d[:4] + [FunctionPass("capture", capture)] + d[4:])
    return seen


def test_capture_returns_the_original_models_values_on_both_kinds(tmp_path):
    net = small_net()
    calib = np.random.default_rng(1).standard_normal((5, 3, 16, 16)).astype(np.float32)
    got = capture_outputs(net, torch.zeros(1, 3, 16, 16), calib)
    with torch.no_grad():
        want = net(torch.as_tensor(calib)).numpy()
    (values,) = got.values()
    np.testing.assert_allclose(values, want, atol=1e-5)
    # a static batch-1 export is fed one sample at a time
    path = str(tmp_path / "net.onnx")
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), path, dynamo=False, opset_version=17)
    (values,) = capture_outputs(path, None, calib).values()
    np.testing.assert_allclose(values, want, atol=1e-4)
