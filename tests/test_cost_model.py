"""The cost model counts every op that multiplies weights or activations (issue 21).

Each test builds its model here (torch export or onnx.helper) and checks graphprune's achieved MAC
ratio against tests/independent_macs.py, which counts MACs from onnxruntime's run-time shapes and
follows control flow as executed, sharing no formula with graphprune's rule table.
"""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.validate import random_feed, run_onnx
from independent_macs import count_macs

torch = pytest.importorskip("torch")


class CnnLstm(torch.nn.Module):
    """An OCR-style model: convolutions, height folded into the features, a BiLSTM, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.rnn = torch.nn.LSTM(24 * 4, 32, bidirectional=True)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        f = self.body(x)                       # [N, C, 4, W]
        f = f.permute(3, 0, 1, 2).flatten(2)   # [W, N, C*4]
        y, _ = self.rnn(f)
        return self.fc(y)


def _export(model, x, path, **kw):
    torch.manual_seed(0)
    torch.onnx.export(model.eval(), x, str(path), opset_version=17, dynamo=False, **kw)
    return str(path)


def _independent_ratio(src, result, feed):
    return count_macs(result.model, feed) / count_macs(onnx.load(src), feed)


def test_cnn_lstm_counts_the_lstm_and_prunes_its_input_width(tmp_path):
    torch.manual_seed(0)
    src = _export(CnnLstm(), torch.randn(1, 1, 16, 32), tmp_path / "cnn_lstm.onnx")
    loaded = load_onnx(src)
    result = graphprune.prune(src, target_flops=0.7)
    feed = random_feed(loaded.proto, loaded.graph, seed=2)
    independent = _independent_ratio(src, result, feed)
    assert abs(result.report["achieved"] - independent) <= 0.005, (result.report["achieved"], independent)
    assert result.report["achieved"] <= 0.7 + 1e-9
    assert result.report["cost_model"]["exact"]
    # the LSTM's input columns follow the pruned conv channels (4 columns per channel), the hidden size stays
    lstm = next(n for n in result.model.graph.node if n.op_type == "LSTM")
    w = {t.name: t for t in result.model.graph.initializer}[lstm.input[1]]
    assert w.dims[2] < 96 and w.dims[2] % 4 == 0 and w.dims[1] == 4 * 32
    ref = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    np.testing.assert_allclose(run_onnx(result.model, feed)[0], ref, rtol=1e-4, atol=1e-4)


def _if_wrapped_cnn(path, read="x"):
    """A prunable top-level CNN next to an If whose branches convolve the (frozen) model input.

    The condition depends on input values (unknown statically), so the cost model counts the larger
    branch; the feed makes that branch run, so the independent count follows it too.
    """
    rng = np.random.default_rng(0)

    def const(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    cin = 3 if read == "x" else 32

    def branch(name, cout, k):
        return helper.make_graph(
            [helper.make_node("Conv", [read, f"{name}_w"], [f"{name}_y"], pads=[k // 2] * 4)],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, cout, 16, 16])],
            initializer=[const(f"{name}_w", (cout, cin, k, k))])

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1] * 4),
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Greater", ["m", "lo"], ["cond"]),
        helper.make_node("If", ["cond"], ["z"], then_branch=branch("big", 8, 5), else_branch=branch("small", 8, 1)),
    ]
    graph = helper.make_graph(
        nodes, "ifcnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 16, 16])],
        initializer=[const("w1", (32, 3, 3, 3)), const("b1", (32,)), const("w2", (4, 32, 3, 3)), const("b2", (4,)),
                     numpy_helper.from_array(np.array(-1e9, dtype=np.float32), "lo")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_if_wrapped_cnn_counts_the_larger_branch(tmp_path):
    src = _if_wrapped_cnn(tmp_path / "if_cnn.onnx")
    analysis = graphprune.analyze(src)
    if_macs = sum(m.base for m in analysis.mac_terms if m.node.startswith("If"))
    assert if_macs == 16 * 16 * 8 * 3 * 25  # the 5x5 branch, not the 1x1 one
    loaded = load_onnx(src)
    result = graphprune.prune(src, target_flops=0.6, round_to=1)  # the cost model, not rounding, is under test
    feed = random_feed(loaded.proto, loaded.graph, seed=1)
    independent = _independent_ratio(src, result, feed)
    assert abs(result.report["achieved"] - independent) <= 0.005, (result.report["achieved"], independent)


def test_tensor_read_inside_a_branch_keeps_its_channels(tmp_path):
    src = _if_wrapped_cnn(tmp_path / "if_reads_hidden.onnx", read="r1")
    analysis = graphprune.analyze(src)
    assert analysis.is_frozen(int(analysis.roots["r1"][0]))
    assert "subgraph" in analysis.frozen_reason[int(analysis.roots["r1"][0])]
    with pytest.raises(graphprune.GraphpruneError, match="floor"):
        graphprune.prune(src, target_flops=0.6)


def test_if_branch_decided_by_static_shapes_is_the_one_counted():
    # cond = (rank of x == 4) is known statically: the cost is that branch's, whatever its size
    def branch(name, k):
        w = numpy_helper.from_array(np.ones((2, 3, k, k), np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], pads=[k // 2] * 4)],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 2, 8, 8])],
                                 initializer=[w])

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["r"]),
             helper.make_node("Equal", ["r", "four"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=branch("small", 1), else_branch=branch("big", 5))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 8, 8])],
                              initializer=[numpy_helper.from_array(np.array(4, np.int64), "four")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    analysis = graphprune.analyze(model)
    assert analysis.macs() == 8 * 8 * 2 * 3
    assert not analysis.ctx.unknown_costs


def test_loop_with_unknown_trip_count_is_reported_uncounted():
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("MatMul", ["v_in", "v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [4, 4])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "v"], ["out"], body=body)], "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []), helper.make_tensor_value_info("v", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 4])])
    analysis = graphprune.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "trip count" in next(iter(analysis.ctx.unknown_costs.values()))


def test_einsum_and_attention_matmul_are_counted():
    nodes = [helper.make_node("Einsum", ["q", "k"], ["s"], equation="bhid,bhjd->bhij"),
             helper.make_node("MatMul", ["s", "v"], ["o"])]
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 5, 8]) for n in "qkv"],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, 5, 8])])
    analysis = graphprune.analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert analysis.macs() == 2 * (1 * 2 * 5 * 5 * 8)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "graphprune.cli", *args], capture_output=True, text=True)


def test_floor_above_target_is_exit_2_with_the_floor_unless_allowed(tmp_path):
    src = _if_wrapped_cnn(tmp_path / "if_cnn.onnx")  # the If's branch MACs can never be pruned
    out = tmp_path / "out.onnx"
    r = _cli(src, "--target-flops", "0.05", "-o", str(out))
    assert r.returncode == 2 and "floor" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    r = _cli(src, "--target-flops", "0.05", "-o", str(out), "--allow-floor", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["target_met"] is False and report["achieved"] > 0.05


def test_model_without_counted_macs_is_exit_2(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = _cli(str(path), "--target-flops", "0.5", "-o", str(tmp_path / "o.onnx"))
    assert r.returncode == 2 and "achieved" not in r.stdout
