"""TVM backend on CPU with tiny trial budgets: correctness vs onnxruntime, database reuse, RPC loopback."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.tvm
pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from graphprune.backends import tvm_backend as tb  # noqa: E402
from graphprune.backends.ort_backend import random_inputs, run_ort  # noqa: E402
from graphprune.cli import main  # noqa: E402


def _export(module, shape, path):
    torch.manual_seed(0)
    module.eval()
    torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return path


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """Several kernels (conv+bn+relu, strided conv, pooling, linear): exercises the importer."""
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )
    return _export(m, (1, 3, 16, 16), tmp_path_factory.mktemp("m") / "small.onnx")


@pytest.fixture(scope="module")
def one_kernel(tmp_path_factory):
    """A single fused conv+relu kernel keeps tuning tests inside the time budget."""
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU())
    return _export(m, (1, 4, 8, 8), tmp_path_factory.mktemp("k") / "conv.onnx")


@pytest.fixture(scope="module")
def target():
    return tb.make_target("llvm", num_cores=2)


def test_untuned_matches_ort(small_cnn, target):
    ex = tb.compile_untuned(tb.import_onnx(small_cnn), target)
    assert tb.check_against_ort(ex, target, small_cnn) < 1e-4


def test_tune_reuses_database_and_exports(one_kernel, target, tmp_path):
    mod = tb.import_onnx(one_kernel)
    db = tmp_path / "db"
    # three kernels in the channels-last layout: the transposes at the input and output, and the conv
    first = tb.tune(mod, target, db, trials=3)
    assert first.new_trials >= 1 and first.tuned_tasks and first.db_records_after > 0
    (db / "database_tuning_record.json").stat()  # the JSON database is on disk

    second = tb.tune(mod, target, db, trials=3)
    assert second.new_trials == 0 and not second.tuned_tasks
    assert set(second.reused_tasks) == set(first.tasks)

    ex = tb.compile_tuned(mod, target, db)
    assert tb.check_against_ort(ex, target, one_kernel) < 1e-4
    lib = tb.export_library(ex, tmp_path / "conv.so")
    vm = tb.load_library(lib, target)
    feeds = random_inputs(one_kernel)
    import tvm

    out = vm["main"](tvm.runtime.tensor(feeds["input"])).numpy()
    np.testing.assert_allclose(out, run_ort(one_kernel, feeds)[0], rtol=1e-4, atol=1e-4)


def test_cli_tune_second_run_zero_trials(one_kernel, tmp_path):
    """Via the CLI: a pre-filled database means no new trials; export and ORT check still happen."""
    db, so, rep = tmp_path / "db", tmp_path / "m.so", tmp_path / "r.json"
    target = tb.make_target("llvm", num_cores=2)
    tb.tune(tb.import_onnx(one_kernel), target, db, trials=3)  # one trial for each of the three kernels
    res = CliRunner().invoke(main, ["tune", str(one_kernel), "--db", str(db), "--trials", "4",
                                    "--num-cores", "2", "-o", str(so), "--json", str(rep)])
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["new_trials"] == 0 and so.exists() and report["max_abs_diff_vs_ort"] < 1e-4


def test_rpc_loopback_measure_and_tune(one_kernel, target, tmp_path):
    mod = tb.import_onnx(one_kernel)
    ex = tb.compile_untuned(mod, target)
    feeds = random_inputs(one_kernel)
    with tb.local_rpc() as rpc:
        stats = tb.measure_tvm(ex, target, feeds, ["input"], runs=5, warmup=1, rpc=rpc)
        assert stats.runs == 5 and stats.median_ms > 0
        result = tb.tune(mod, target, tmp_path / "db", trials=1, rpc=rpc)
        assert result.new_trials >= 1 and result.db_records_after >= 1


def test_cuda_target_unavailable_message():
    with pytest.raises(tb.GraphpruneError, match="CUDA-enabled TVM"):
        tb.make_target("cuda")


@pytest.mark.slow  # a real (1-trial) tuning session: minutes on a shared 2-core machine
def test_cli_tune_pins_dynamic_dims_and_logs_to_the_database(tmp_path):
    """A model with dynamic batch/height/width tunes once --input-shape pins it; TVM's log goes to DB/logs."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path / "dyn.onnx"
    torch.onnx.export(m, (torch.randn(1, 4, 8, 8),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "output": {0: "n", 2: "h", 3: "w"}})
    db, rep = tmp_path / "db", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["tune", str(path), "--db", str(db), "--trials", "1", "--num-cores", "2",
                                    "--input-shape", "1,4,8,8", "--json", str(rep)])
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["input_shape"] == "1,4,8,8" and report["max_abs_diff_vs_ort"] < 1e-4
    assert any((db / "logs").iterdir())
    assert "[INFO]" not in res.output and "ID | Name" not in res.output
    res = CliRunner().invoke(main, ["tune", str(path), "--db", str(db), "--trials", "1", "--num-cores", "2"])
    assert res.exit_code == 2 and "--input-shape" in res.output
