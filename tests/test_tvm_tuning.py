"""TVM tuning that records and resumes (issue 17): every measured batch is in the database as soon as
it is measured, an interrupted run keeps it, a second run adds nothing, and "tuned" is never claimed
for a kernel without records. Small budgets on one conv kernel so it fits the 2-core CI machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.tvm
pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from graphprune.backends import tvm_backend as tb  # noqa: E402
from graphprune.backends.ort_backend import random_inputs  # noqa: E402
from graphprune.cli import main  # noqa: E402

TRIALS = 32


@pytest.fixture(scope="module", autouse=True)
def _one_kernel_layout():
    """The recording/resume tests count trials and records of one kernel. In the default channels-last
    layout a conv model also has a transpose kernel at its input and its output, so these tests compile
    in NCHW (GRAPHPRUNE_TVM_LAYOUT=nchw, inherited by the CLI subprocess); the layout's own tests below
    and tests/test_backend_tvm.py tune and check the channels-last kernels."""
    saved = os.environ.get("GRAPHPRUNE_TVM_LAYOUT")
    os.environ["GRAPHPRUNE_TVM_LAYOUT"] = "nchw"
    yield
    if saved is None:
        os.environ.pop("GRAPHPRUNE_TVM_LAYOUT", None)
    else:
        os.environ["GRAPHPRUNE_TVM_LAYOUT"] = saved


def _records(db: Path) -> int:
    path = db / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory) -> Path:
    """One fused conv+bias+relu kernel, large enough that schedules differ clearly in speed."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU()).eval()
    path = tmp_path_factory.mktemp("tune") / "conv.onnx"
    torch.onnx.export(m, (torch.randn(1, 16, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return path


@pytest.fixture(scope="module")
def target():
    return tb.make_target("llvm", num_cores=2)


@pytest.fixture(scope="module")
def tuned_db(conv_model, target, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "db"
    result = tb.tune(tb.import_onnx(conv_model), target, db, trials=TRIALS)
    return db, result


def test_tuning_writes_every_measured_candidate(tuned_db):
    db, result = tuned_db
    assert result.new_trials == TRIALS and result.tuned_tasks == result.tasks
    assert _records(db) == result.db_records_after == TRIALS
    state = json.loads((db / tb.STATE_FILE).read_text())
    (entry,) = state.values()
    assert entry["measured"] == TRIALS and entry["complete"] is True
    assert all(ms > 0 for ms in result.best_ms.values())


def test_second_run_adds_nothing_and_reuses(tuned_db, conv_model, target):
    db, first = tuned_db
    second = tb.tune(tb.import_onnx(conv_model), target, db, trials=TRIALS)
    assert second.new_trials == 0 and not second.tuned_tasks
    assert set(second.reused_tasks) == set(first.tasks) and _records(db) == TRIALS
    cover = tb.kernel_coverage(tb.import_onnx(conv_model), target, db)
    assert cover["kernels_tuned"] == cover["kernels"] == 1 and not cover["kernels_default"]


def _record_ms(record) -> float:
    return sum(float(x) for x in record.run_secs) / len(record.run_secs) * 1e3


def test_default_schedule_is_the_first_measured_candidate(tuned_db, conv_model, target):
    """Tuning starts from the rule-based default schedule: it is measured first and committed like any
    record (one of the TRIALS), so the database's best record, which `compile_tuned` uses, is at worst
    the default schedule, never a slower random candidate."""
    from tvm.s_tir import meta_schedule as ms

    db, result = tuned_db
    (entry,) = json.loads((db / tb.STATE_FILE).read_text()).values()
    (task,) = ms.relax_integration.extract_tasks(tb._fuse_for_tuning(tb.import_onnx(conv_model), target), target)
    assert result.default_ms == {task.task_name: entry["default_ms"]} and entry["default_ms"] > 0
    default = tb.default_trace(task.dispatched[0], target)
    assert default is not None and "vectorize" in str(default)
    first = json.loads((db / "database_tuning_record.json").read_text().splitlines()[0])
    database = tb.open_database(db)
    # the valid records (a candidate that failed to run, e.g. timed out on a loaded machine, is not one)
    records = database.get_top_k(database.commit_workload(task.dispatched[0]), 1 << 20)
    # every candidate is timed as REPEATS samples (not one mean of 3 runs: a lucky sample won), the default too
    assert records and all(len(r.run_secs) == tb.REPEATS for r in records)
    # the search may measure the default's trace again (evolution starts from the database's best), so
    # the default's record is one of the records with its trace, not necessarily the fastest of them
    ours = [r for r in records if str(r.trace) == str(default)]
    assert any(_record_ms(r) == pytest.approx(entry["default_ms"]) for r in ours), \
        ([_record_ms(r) for r in ours], entry["default_ms"])
    # the first line of the database is the default's record
    first_record = ms.database.TuningRecord.from_json(first[1], database.commit_workload(task.dispatched[0]))
    assert str(first_record.trace) == str(default) and _record_ms(first_record) == pytest.approx(entry["default_ms"])
    assert _record_ms(records[0]) <= entry["default_ms"] and result.best_ms[task.task_name] == pytest.approx(
        _record_ms(records[0]))


def _median_ms(executable, target, model) -> float:
    feeds = random_inputs(model)
    return tb.measure_tvm(executable, target, feeds, tb.graph_input_names(model), runs=15, warmup=3).median_ms


def test_tuned_build_is_faster_than_untuned(tuned_db, conv_model, target):
    db, _ = tuned_db
    mod = tb.import_onnx(conv_model)
    tuned = tb.compile_tuned(mod, target, db)
    assert tb.check_against_ort(tuned, target, conv_model) < 1e-4
    plain = tb.compile_untuned(mod, target, schedule="none")
    default = tb.compile_untuned(mod, target)
    assert tb.check_against_ort(default, target, conv_model) < 1e-4
    t_tuned, t_plain = _median_ms(tuned, target, conv_model), _median_ms(plain, target, conv_model)
    assert t_tuned < t_plain, (t_tuned, t_plain)
    # the default schedule (no measurement) also beats TVM's unscheduled loops
    assert _median_ms(default, target, conv_model) < t_plain


def test_interrupted_run_keeps_what_it_measured_and_resumes(conv_model, tmp_path):
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "graphprune.cli", "tune", str(conv_model), "--db", str(db),
           "--trials", str(3 * 16), "--num-cores", "2", "--no-check"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    state_file = db / tb.STATE_FILE
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            # past the default schedule (saved on its own) and into the search's first batch
            if state_file.exists() and any(e.get("measured", 0) > 1
                                           for e in json.loads(state_file.read_text() or "{}").values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "tuning ended before it could be interrupted"
        assert state_file.exists(), "no batch was measured in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    kept = _records(db)
    (entry,) = json.loads(state_file.read_text()).values()
    assert 16 <= entry["measured"] < 3 * 16 and kept >= entry["measured"] and entry["complete"] is False

    report = tmp_path / "r.json"
    # (--no-verify: the in-model check may set the kernel's record aside; this test counts records)
    res = CliRunner().invoke(main, ["tune", str(conv_model), "--db", str(db), "--trials", str(3 * 16),
                                    "--num-cores", "2", "--no-check", "--no-verify", "--json", str(report)])
    assert res.exit_code == 0, res.output
    resumed = json.loads(report.read_text())
    assert resumed["new_trials"] == 3 * 16 - entry["measured"], resumed  # only the remainder is tuned
    assert resumed["db_records_before"] == kept and resumed["kernels_tuned"] == resumed["kernels"]


def test_time_budget_stops_and_says_so(conv_model, tmp_path):
    """A budget too small for even one batch: nothing is claimed, the run says it stopped."""
    result = tb.tune(tb.import_onnx(conv_model), tb.make_target("llvm", num_cores=2), tmp_path / "db",
                     trials=1000, time_budget_s=1e-6)
    assert result.stopped == "time budget" and result.new_trials == 0
    cover = tb.kernel_coverage(tb.import_onnx(conv_model), tb.make_target("llvm", num_cores=2), tmp_path / "db")
    assert cover["kernels_tuned"] == 0 and len(cover["kernels_default"]) == cover["kernels"]


@pytest.mark.parametrize("text,expected", [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0)])
def test_time_budget_parsing(text, expected):
    from graphprune.cli_backend import _parse_duration

    assert _parse_duration(text) == expected


def test_bench_never_claims_tuned_without_records(conv_model, tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(conv_model), "--backend", "tvm", "--threads", "2", "--runs", "3",
                                    "--warmup", "1", "--db", str(tmp_path / "empty_db"), "--json", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    row = json.loads(text)
    rows = row.get("models") or row.get("rows") or [row]
    first = rows[0] if isinstance(rows, list) else rows
    assert first["tuned"] is False and first["kernels_tuned"] == 0 and first["kernels_default"]
    assert np.isfinite(first["latency"]["median_ms"])


def test_time_budget_ends_a_kernel_after_its_batch(conv_model, tmp_path):
    """The budget runs out during the first batch: that batch is kept, the kernel is ended, and the
    state says it is not complete, so the next run resumes it."""
    db = tmp_path / "db"
    result = tb.tune(tb.import_onnx(conv_model), tb.make_target("llvm", num_cores=2), db, trials=1000,
                     time_budget_s=1.0)
    assert result.stopped == "time budget" and 0 < result.new_trials < 1000
    (entry,) = json.loads((db / tb.STATE_FILE).read_text()).values()
    assert entry["complete"] is False and entry["measured"] == result.new_trials == _records(db)


def test_time_budget_ending_in_a_calls_last_batch(conv_model, tmp_path, monkeypatch):
    """The budget runs out while the batch that uses up the kernel's trials is measured: MetaSchedule then
    ends the task itself, and ending it from the budget as well was its InternalError "TerminateTask ...
    is_terminated" (the session-3 device run, and the device script's smoke test). The run keeps the
    default and the whole batch, says the kernel is complete, and a deeper call resumes it. The tuner's clock
    stands still until the search's batch reports, then jumps past the budget (on a loaded machine a real
    budget may run out before the search starts)."""
    import types

    db = tmp_path / "db"
    target = tb.make_target("llvm", num_cores=2)
    jumped = []

    def on_trials(name, n, best):
        if n > 1:  # the search's batch (the default schedule reports alone)
            jumped.append(True)

    clock = types.SimpleNamespace(perf_counter=lambda: 1e9 if jumped else 0.0, monotonic=time.monotonic,
                                  sleep=time.sleep)
    monkeypatch.setattr(tb, "time", clock)
    result = tb.tune(tb.import_onnx(conv_model), target, db, trials=1000, trials_per_task=17, time_budget_s=1.0,
                     on_trials=on_trials)
    monkeypatch.undo()
    assert jumped and result.new_trials == 17 == _records(db), result  # the default, then one batch of 16
    (entry,) = json.loads((db / tb.STATE_FILE).read_text()).values()
    assert entry["complete"] is True and entry["measured"] == 17
    again = tb.tune(tb.import_onnx(conv_model), target, db, trials=1000, trials_per_task=17)
    assert again.new_trials == 0 and again.reused_tasks  # the same depth: nothing to do
    deeper = tb.tune(tb.import_onnx(conv_model), target, db, trials=1000, trials_per_task=33, time_budget_s=2.0)
    assert deeper.tuned_tasks and deeper.new_trials >= 16 and _records(db) == 17 + deeper.new_trials


def test_default_schedule_vectorises_and_blocks(conv_model, target, monkeypatch):
    """The default schedule of a convolution: channels-last, output channels vectorised (a power of two of at
    most two registers), a register block of output pixels, the weights repacked in the order the loops
    read them (computed once at build time), and nothing left unscheduled."""
    from tvm.s_tir import meta_schedule as ms

    monkeypatch.delenv("GRAPHPRUNE_TVM_LAYOUT")
    fused = tb._fuse_for_tuning(tb.import_onnx(conv_model), target)
    lanes = tb.vector_lanes(target)
    convs = [t for t in ms.relax_integration.extract_tasks(fused, target) if "conv2d" in t.task_name]
    assert convs
    for task in convs:
        assert "conv2d_nhwc" in task.dispatched[0].script()
        trace = tb.default_trace(task.dispatched[0], target)
        spatial = [list(map(int, trace.decisions[i])) for i in trace.insts
                   if i.kind.name == "SamplePerfectTile" and int(i.attrs[0]) == 4]
        _, _, width, channels = spatial
        assert channels[-1] == min(2 * lanes, 32) and int(np.prod(channels)) == 32  # 32 output channels
        assert width[-1] > 1 and int(np.prod(width)) % width[-1] == 0
        kinds = {i.kind.name for i in trace.insts}
        assert "TransformLayout" in kinds or "LayoutTransform" in kinds, kinds
        scheduled = tb.default_schedule_database(target).query_schedule(task.dispatched[0], target, "main")
        assert scheduled is not None and "vectorize" in str(scheduled.mod)


def test_channels_last_matches_onnxruntime(tmp_path, target, monkeypatch):
    """channels_last asks ungrouped convs for NHWC data and HWIO weights (a depthwise conv follows its input's
    layout and keeps its weights); the compiled model (strided, depthwise, 1x1, residual add, mean)
    still equals onnxruntime."""
    monkeypatch.delenv("GRAPHPRUNE_TVM_LAYOUT")
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.pw = torch.nn.Conv2d(16, 16, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return torch.relu(self.pw(self.dw(y)) + y).mean((2, 3))

    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), (torch.randn(1, 8, 20, 20),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    mod = tb.channels_last(tb.import_onnx(path))
    text = mod.script()
    assert text.count('kernel_layout="HWIO"') == 2 and text.count('data_layout="NCHW"') == 0
    ex = tb.compile_untuned(tb.import_onnx(path), target)
    assert tb.check_against_ort(ex, target, path) < 1e-4




def test_pad_in_task_variant_matches_onnxruntime(tmp_path, target, monkeypatch):
    """GRAPHPRUNE_TVM_PAD=task computes each conv's padded rows inside its parallel tasks: one parallel loop per
    conv instead of two, and the same outputs as onnxruntime (strided, 1x1 and residual convs)."""
    from tvm.s_tir import meta_schedule as ms

    monkeypatch.delenv("GRAPHPRUNE_TVM_LAYOUT")
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.b = torch.nn.Conv2d(16, 16, 3, padding=1)
            self.down = torch.nn.Conv2d(8, 16, 1, stride=2)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + self.down(x))

    path = tmp_path / "block.onnx"
    torch.onnx.export(Block().eval(), (torch.randn(1, 8, 20, 20),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    mod = tb.import_onnx(path)
    loops = {}
    for pad in ("once", "task"):
        monkeypatch.setenv("GRAPHPRUNE_TVM_PAD", pad)
        rows = tb.kernel_parallelism(mod, target)
        loops[pad] = {r["kernel"]: len(r["parallel"]) for r in rows if "conv2d" in r["kernel"]}
        assert tb.check_against_ort(tb.compile_untuned(mod, target), target, path) < 1e-4
    padded = [k for k, n in loops["once"].items() if n == 2]  # the 3x3 convs: a padding loop, then the conv's
    assert padded and all(loops["task"][k] == 1 for k in padded), loops


def test_profile_kernels_times_every_kernel(conv_model, target, monkeypatch):
    """profile_kernels: one positive time per kernel of the model (not timed against anything), and the static
    view (kernel_parallelism) names the same kernels with their calls, FLOPs and parallel loops."""
    monkeypatch.delenv("GRAPHPRUNE_TVM_LAYOUT")
    mod = tb.import_onnx(conv_model)
    ex = tb.compile_untuned(mod, target)
    feeds = random_inputs(str(conv_model))
    times = tb.profile_kernels(ex, target, feeds, tb.graph_input_names(str(conv_model)), runs=3, warmup=1)
    rows = tb.kernel_parallelism(mod, target)
    assert {r["kernel"] for r in rows} <= set(times) and all(v > 0 for v in times.values())
    cpu = tb.profile_kernels(ex, target, feeds, tb.graph_input_names(str(conv_model)), runs=3, clock="thread")
    assert set(cpu) == set(times) and all(v >= 0 for v in cpu.values())
    conv = next(r for r in rows if "conv2d" in r["kernel"])
    assert conv["calls"] == 1 and conv["flops"] > 0 and conv["parallel"] and min(conv["parallel"]) >= 2


# ---- in-model verification (tvm_verify): a tuned record slower than the default schedule in the model is set aside


@pytest.fixture(scope="module")
def two_conv_model(tmp_path_factory) -> Path:
    """Two fused kernels of different shapes (NCHW, see _one_kernel_layout): one to spoil, one to keep."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(32, 16, 3, padding=1)).eval()
    path = tmp_path_factory.mktemp("verify") / "two_conv.onnx"
    torch.onnx.export(m, (torch.randn(1, 16, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    return path


def _spoil(db: Path, task, target) -> None:
    """Commit an unscheduled schedule (one thread, no vectorisation: several times slower than the default)
    for `task`, with a fake measured time that makes it the database's best record, as a lucky measurement
    of a slow candidate would."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    database = tb.open_database(db)
    mod = task.dispatched[0]
    workload = database.commit_workload(mod)
    sch = Schedule(mod)
    sch.get_sblock("root", "main")  # one instruction: the database ignores records with an empty trace
    database.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [1e-9], target,
                                                           ms.arg_info.ArgInfo.from_entry_func(mod, True)))


def _defaults_db(model: Path, target, db: Path):
    """A database whose only records are each kernel's measured default schedule (one trial per kernel)."""
    mod = tb.import_onnx(model)
    tb.tune(mod, target, db, trials=8, trials_per_task=1)
    rows = tb.best_records(mod, target, db)
    assert len(rows) == 2 and all(r.record is not None for r in rows)
    return mod, rows


def test_verification_reverts_a_slower_record_and_reuses_the_choice(two_conv_model, target, tmp_path, monkeypatch):
    from graphprune.backends import tvm_verify as tv
    from tvm.s_tir import meta_schedule as ms

    db = tmp_path / "db"
    mod, rows = _defaults_db(two_conv_model, target, db)
    spoilt = max(rows, key=lambda r: tb._task_flops(r.task))
    kept = next(r for r in rows if r is not spoilt)
    _spoil(db, spoilt.task, target)
    assert tb.best_records(mod, target, db)[rows.index(spoilt)].record.run_secs[0].value < 1e-6
    # unverified: the spoilt record is what compile_tuned would use, and coverage says it is tuned
    assert tb.kernel_coverage(mod, target, db)["kernels_tuned"] == 2

    feeds = random_inputs(str(two_conv_model))
    order = tb.graph_input_names(str(two_conv_model))
    # the unscheduled kernel is several times slower; a wide tolerance keeps the 2-core machine's noise out
    result, ex = tv.verify_tuned(mod, target, db, feeds, order, rounds=3, runs=5, tolerance=0.25)
    assert result.reverted == [spoilt.name] and result.same_as_default == [kept.name] and not result.kept, result
    assert not result.model_fallback and result.kernel_ms[spoilt.name]["tuned"] > result.kernel_ms[spoilt.name]["default"]
    assert result.model_ms["verified"] < result.model_ms["tuned"]
    assert tb.check_against_ort(ex, target, two_conv_model) < 1e-4
    # the choice is in the database folder: a later build uses the default schedule for the spoilt kernel ...
    database = tb.tuned_database(mod, target, db)
    scheduled = database.query_schedule(spoilt.task.dispatched[0], target, "main")
    assert scheduled is not None and "vectorize" in str(scheduled.mod)
    raw = tb.tuned_database(mod, target, db, verified=False).query_schedule(spoilt.task.dispatched[0], target, "main")
    assert "vectorize" not in str(raw.mod)
    cover = tb.kernel_coverage(mod, target, db)
    assert cover["kernels_tuned"] == 1 and cover["kernels_reverted"] == [spoilt.name] == cover["kernels_default"]
    assert not cover["kernels_unverified"]

    # ... and verifying again profiles nothing
    def no_profiling(*args, **kwargs):
        raise AssertionError("the stored choice should have been reused")

    monkeypatch.setattr(tb, "profile_kernels", no_profiling)
    again, _ = tv.verify_tuned(mod, target, db, feeds, order)
    assert again.reused and again.reverted == [spoilt.name] and again.same_as_default == [kept.name]
    # a new best record for the kernel is not covered by the old choice: it is used, and unverified
    monkeypatch.undo()
    database = tb.open_database(db)
    record = ms.database.TuningRecord(spoilt.record.trace, database.commit_workload(spoilt.task.dispatched[0]),
                                      [1e-10], target, spoilt.record.args_info)
    database.commit_tuning_record(record)
    cover = tb.kernel_coverage(mod, target, db)
    assert cover["kernels_tuned"] == 2 and cover["kernels_unverified"] == [spoilt.name]


def test_verification_decides_by_in_model_time(two_conv_model, target, tmp_path, monkeypatch):
    """The decision per kernel, from a fake profile: 10% slower in the model -> default schedule; 2% slower
    (within the 3% tolerance) or faster -> the tuned record stays; and when the model as a whole is slower
    than the default build, every record is set aside."""
    from graphprune.backends import tvm_verify as tv

    db = tmp_path / "db"
    mod, rows = _defaults_db(two_conv_model, target, db)
    for r in rows:
        _spoil(db, r.task, target)  # both kernels now have a record that differs from the default
    a, b = rows
    feeds = random_inputs(str(two_conv_model))
    order = tb.graph_input_names(str(two_conv_model))
    for tuned_b, model_tuned, reverted, fallback in ((1.02, 1.0, [a.name], False), (0.9, 1.0, [a.name], False),
                                                     (1.02, 1.2, [a.name, b.name], True)):
        fake = {"default": {a.name: 1.0, b.name: 1.0}, "tuned": {a.name: 1.1, b.name: tuned_b}}
        monkeypatch.setattr(tv, "_kernel_ms", lambda *args, **kw: fake)
        monkeypatch.setattr(tv, "_model_ms", lambda ex, *args, **kw: {"default": 1.0, "tuned": 1.1,
                                                                      "verified": model_tuned})
        result, _ = tv.verify_tuned(mod, target, db, feeds, order, force=True)
        assert sorted(result.reverted) == sorted(reverted) and result.model_fallback is fallback, result
        assert result.kept == ([] if fallback else [b.name])
        cover = tb.kernel_coverage(mod, target, db)
        assert sorted(cover["kernels_reverted"]) == sorted(reverted)
        assert cover["kernels_tuned"] == 2 - len(reverted)


def test_bench_and_tune_report_reverted_kernels(two_conv_model, target, tmp_path):
    """The CLI checks records in the model before it builds: a spoilt record is set aside, the report says so
    (and does not call the model tuned), and `tune` on the same database reuses the choice."""
    db = tmp_path / "db"
    mod, rows = _defaults_db(two_conv_model, target, db)
    spoilt = max(rows, key=lambda r: tb._task_flops(r.task))
    _spoil(db, spoilt.task, target)
    out = tmp_path / "b.json"
    # the fixture's target (LLVM's generic x86-64): the records were made for it
    res = CliRunner().invoke(main, ["bench", str(two_conv_model), "--backend", "tvm", "--threads", "2", "--runs", "3",
                                    "--warmup", "1", "--db", str(db), "--mcpu", "generic", "--json", str(out)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["models"]
    assert row["kernels_reverted"] == [spoilt.name] and row["tuned"] is False and row["kernels_tuned"] == 1
    report = tmp_path / "t.json"
    res = CliRunner().invoke(main, ["tune", str(two_conv_model), "--db", str(db), "--trials", "2",
                                    "--trials-per-task", "1", "--num-cores", "2", "--mcpu", "generic", "--json",
                                    str(report)])
    assert res.exit_code == 0, res.output
    tuned = json.loads(report.read_text())
    assert tuned["verification"]["reused"] and tuned["verification"]["reverted"] == [spoilt.name]
    assert tuned["kernels_reverted"] == [spoilt.name] and tuned["max_abs_diff_vs_ort"] < 1e-4


def _llvm_functions(executable) -> dict[str, str]:
    """Each generated LLVM function of a build, without metadata references (they number differently)."""
    import re

    source = ""
    for module in [executable.mod, *getattr(executable.mod, "imports", [])]:
        for get in ("inspect_source", "get_source"):
            try:
                source += getattr(module, get)("ll")
                break
            except Exception:  # noqa: BLE001 - a module kind without LLVM source
                continue
    return {m.group(1): re.sub(r"!\d+", "", m.group(0))
            for m in re.finditer(r'define [^@]*@"?([\w.]+)"?\(.*?\n}\n', source, re.S)}


def test_default_schedules_as_records_build_the_same_code(conv_model, target, tmp_path, monkeypatch):
    """A database whose best records are the default schedules must give the default build's code, kernel
    for kernel (channels-last, pre-packed weights): what the in-model check compares between the default and
    the tuned build is then how the build runs, not different code (docs/backends.md, session 5)."""
    from tvm.s_tir import meta_schedule as ms

    monkeypatch.delenv("GRAPHPRUNE_TVM_LAYOUT", raising=False)  # the default layout, with pre-packing
    mod = tb.import_onnx(conv_model)
    db = tmp_path / "db"
    database = tb.open_database(db)
    tasks = ms.relax_integration.extract_tasks(tb._fuse_for_tuning(mod, target), target)
    committed = 0
    for task in tasks:
        trace = tb.default_trace(task.dispatched[0], target)
        if trace is not None:
            workload = database.commit_workload(task.dispatched[0])
            database.commit_tuning_record(ms.database.TuningRecord(trace, workload, [1e-3], target, None))
            committed += 1
    assert committed >= 1
    default = _llvm_functions(tb.compile_untuned(mod, target))
    tuned = _llvm_functions(tb.compile_tuned(mod, target, db, verified=False))
    assert default and default == tuned
    # the comparison can fail: TVM's unscheduled build of the same model is different code
    assert _llvm_functions(tb.compile_untuned(mod, target, schedule="none")) != default
