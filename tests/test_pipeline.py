"""The pass pipeline itself: the default pass lists, the manager's timing/progress/errors, user pass lists,
and the calibration-driven passes in their places on both model kinds."""
import numpy as np
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.passes.stages import Analyze, Lower, default_passes
from graphprune.pipeline import FunctionPass, PassManager, PruneOptions, PruneState

torch = pytest.importorskip("torch")


def names(options: PruneOptions) -> list[str]:
    return [p.name for p in default_passes(options)]


def test_default_pipelines_read_as_lists():
    assert names(PruneOptions("macs", 0.5)) == ["lower", "analyze", "round_to", "score", "allocate", "rewrite",
                                                "validate", "measure", "report"]
    assert names(PruneOptions("latency", 0.5)) == ["lower", "analyze", "round_to", "latency_cost", "score",
                                                   "allocate", "rewrite", "validate", "measure", "report"]
    assert "measure" not in names(PruneOptions("macs", 0.5, measure=False))
    assert names(PruneOptions(method="di", target_kind="macs", target=0.5))[3] == "search"
    assert names(PruneOptions(removed=frozenset({1})))[2:5] == ["round_to", "explicit_plan", "rewrite"]
    calib = np.zeros((4, 3, 8, 8))
    # calibration data: statistics before the plan, recovery after the rewrite, held-out agreement last
    assert names(PruneOptions("macs", 0.5, method="act", calibration=calib)) == [
        "lower", "analyze", "calibrate", "statistics", "round_to", "score", "allocate", "rewrite", "recover",
        "validate", "agreement", "measure", "report"]
    # recover=none with a weight criterion: no statistics pass (nothing reads them)
    assert "statistics" not in names(PruneOptions("macs", 0.5, calibration=calib, recover="none"))
    # di reads its labelled data itself: no calibration passes unless recovery is asked for
    assert names(PruneOptions("macs", 0.5, method="di", calibration=calib))[2:4] == ["round_to", "search"]
    assert names(PruneOptions("macs", 0.5, method="di", calibration=calib, recover="bias"))[2:4] == [
        "calibrate", "statistics"]
    assert names(PruneOptions("macs", 0.5, strategy="sensitivity", calibration=calib, recover="none"))[2:6] == [
        "calibrate", "round_to", "score", "sensitivity"]


def test_report_lists_every_pass_and_times_them():
    seen = []
    result = graphprune.prune(example_cnn(image=16), target_flops=0.5, progress=seen.append)
    run = [p["name"] for p in result.report["passes"]]
    assert run == ["lower", "analyze", "round_to", "score", "allocate", "rewrite", "validate", "measure", "report"]
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


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_calibration_passes_run_on_both_kinds(kind, tmp_path):
    """One pass list for both kinds: act scores from statistics, recovery after the rewrite, agreement."""
    net = small_net()
    calib = np.random.default_rng(2).standard_normal((12, 3, 16, 16)).astype(np.float32)
    model, example = net, torch.zeros(1, 3, 16, 16)
    if kind == "onnx":
        model, example = str(tmp_path / "net.onnx"), None
        torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), model, dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    seen = []
    result = graphprune.prune(model, example, target_flops=0.6, calib=calib, progress=seen.append)
    run = [p["name"] for p in result.report["passes"]]
    assert run == ["lower", "analyze", "calibrate", "statistics", "round_to", "score", "allocate", "rewrite",
                   "recover", "validate", "agreement", "measure", "report"]
    assert result.report["method"] == "act" and result.report["recovery"]["mode"] == "lsq"
    assert result.report["recovery"]["layers"] and "agreement" in result.report["recovery"]
    assert result.report["calibration"]["samples"] == 12
    assert {"calib_s", "recover_s"} <= set(result.report["time"])
    assert "recovering accuracy (lsq)" in seen
