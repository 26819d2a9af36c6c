"""--round-to auto, the measured speed-up in every prune, --min-speedup, and an interleaved `bench` (not timed)."""
import json

import onnx
import pytest

import graphprune
from graphprune.backends import channel_table as ct
from graphprune.examples import example_cnn
from graphprune.passes.allocate import STRICT_MARGIN, floor_fraction, group_multiples


from test_cli import example, run_cli  # noqa: F401,E402  (example is a fixture)


def _kept_counts(result):
    return {g.id: (g.size, sum(1 for r in g.classes if r not in result.plan.removed)) for g in result.analysis.groups}


def test_shipped_table_has_a_measured_multiple_per_hardware():
    table = ct.load_table()
    assert "ort-cpu" in table
    for hw, entry in table.items():
        assert entry["multiple"] in ct.CANDIDATES
        assert entry["measured_on"] and entry["curves"], hw
        # the stored choice is what the selection rule gives on the stored curves
        curves = {op: [(c, 1.0, ms) for c, ms in rows] for op, rows in entry["curves"].items()}
        macs_curves = {}
        for op, rows in curves.items():
            size = dict((n, s) for n, s, _ in ct.OPS)[op]
            k = 1 if op == "conv1x1" else 3
            macs_curves[op] = [(c, float(c * (1 if op.startswith("dw") else c) * k * k * size * size), ms)
                               for c, _, ms in rows]
        assert ct.choose_multiple(macs_curves)[0] == entry["multiple"], hw


def test_round_to_auto_keeps_multiples_from_the_table(monkeypatch, tmp_path):
    for multiple in (8, ct.channel_multiple("ort-cpu")):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"cache{multiple}"))
        ct.write_table({"ort-cpu": {"multiple": multiple, "measured_on": "test", "curves": {}}}, ct.user_table_path())
        assert ct.channel_multiple("ort-cpu") == multiple
        result = graphprune.prune(example_cnn(), target_flops=0.5, measure=False)
        assert result.report["round_to"] == multiple and result.report["round_to_source"].startswith("auto")
        steps = group_multiples(result.analysis, multiple)
        assert any(s == multiple for s in steps.values())
        pruned = 0
        for gid, (size, kept) in _kept_counts(result).items():
            if kept != size:
                pruned += 1
                assert kept % steps[gid] == 0, (gid, size, kept, steps[gid])
        assert pruned > 0


def test_group_multiples_halve_for_small_groups():
    analysis = graphprune.analyze(example_cnn())
    steps = group_multiples(analysis, 32)
    for g in analysis.groups:
        assert steps[g.id] <= 32 and (g.size >= 2 * steps[g.id] or steps[g.id] == 1)


def test_choose_multiple_finds_the_staircase_step():
    def curve(step):
        rows = []
        for c in range(64, 193):
            padded = -(-c // step) * step  # latency of a blocked kernel: the next multiple of the step
            rows.append((c, float(c * c), padded * padded * 1e-3))
        return rows

    for step in (1, 8, 16, 32):  # (a 4-step costs <2% here: within TOLERANCE, 2 is chosen)
        assert ct.choose_multiple({"a": curve(step), "b": curve(step)})[0] == step


def test_prune_reports_measured_speedup_next_to_flops(example, tmp_path):
    proc = run_cli(str(example), "--target-flops", "0.4", "-o", str(tmp_path / "s.onnx"), "--json")
    assert proc.returncode == 0, proc.stderr
    lat = json.loads(proc.stdout)["latency"]
    assert lat["backend"] == "onnxruntime CPU" and lat["rounds"] >= 5
    assert lat["speedup"] == pytest.approx(lat["before_ms"] / lat["after_ms"])
    assert lat["flops_speedup"] > 2
    human = run_cli(str(example), "--target-flops", "0.4", "-o", str(tmp_path / "s2.onnx"))
    assert "speed-up" in human.stdout and "FLOPs reduction" in human.stdout


def test_min_speedup_fails_cleanly_and_writes_nothing(example, tmp_path):
    out = tmp_path / "slim.onnx"
    proc = run_cli(str(example), "--target-flops", "0.4", "-o", str(out), "--min-speedup", "1000")
    assert proc.returncode == 3
    assert "below --min-speedup 1000x" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".graphprune-*"))


def test_no_measure_skips_timing_and_conflicts_with_min_speedup(example, tmp_path):
    proc = run_cli(str(example), "--target-flops", "0.4", "--dry-run", "--json", "--no-measure")
    assert proc.returncode == 0, proc.stderr
    assert "latency" not in json.loads(proc.stdout)
    proc = run_cli(str(example), "--target-flops", "0.4", "--dry-run", "--no-measure", "--min-speedup", "1.1")
    assert proc.returncode == 2 and "needs the latency measurement" in proc.stderr


def test_bench_interleaves_and_checks_interfaces(example, tmp_path):
    slim = tmp_path / "slim.onnx"
    assert run_cli(str(example), "--target-flops", "0.4", "-o", str(slim), "--no-measure").returncode == 0
    report_path = tmp_path / "bench.json"
    proc = run_cli("bench", str(example), "--compare", str(slim), "--runs", "5", "--warmup", "1",
                   "--input-shape", "2,3,32,32", "--json", str(report_path))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert report["interleaved"] and [m["latency"]["runs"] for m in report["models"]] == [5, 5]
    assert {"speedup", "noise_pct", "meaningful"} <= set(report)
    other = tmp_path / "other.onnx"
    onnx.save(example_cnn(image=64), other)
    proc = run_cli("bench", str(example), "--compare", str(other), "--runs", "3")
    assert proc.returncode == 2 and "not a drop-in replacement" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_round_to_auto_keeps_wide_groups_at_the_full_multiple(monkeypatch, tmp_path):
    """Strict multiples: no group is pruned to a count between two multiples (no time saved there)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ct.write_table({"ort-cpu": {"multiple": 16, "measured_on": "test", "curves": {}}}, ct.user_table_path())
    result = graphprune.prune(example_cnn(), target_flops=0.5, measure=False)
    assert "halved" not in result.report["round_to_source"]
    pruned = {gid: (size, kept) for gid, (size, kept) in _kept_counts(result).items() if kept != size}
    assert pruned and all(kept % 16 == 0 for _, kept in pruned.values()), pruned
    # the halving rule would have allowed counts such as 8 in the 24- and 32-wide groups
    assert any(m == 8 for m in group_multiples(result.analysis, 16).values())


def test_round_to_auto_halves_small_groups_only_when_the_target_needs_it(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ct.write_table({"ort-cpu": {"multiple": 64, "measured_on": "test", "curves": {}}}, ct.user_table_path())
    analysis = graphprune.analyze(example_cnn())
    strict = group_multiples(analysis, 64, halve=False)
    assert floor_fraction(analysis, "macs", strict) > 0.5 - STRICT_MARGIN  # 64-multiples cannot get there
    result = graphprune.prune(example_cnn(), target_flops=0.5, measure=False)
    assert "halved" in result.report["round_to_source"]
    assert result.report["macs"]["ratio"] <= 0.5
    steps = group_multiples(result.analysis, 64)
    for gid, (size, kept) in _kept_counts(result).items():
        assert kept == size or kept % steps[gid] == 0


def test_round_to_auto_never_misses_a_target_for_the_sake_of_rounding(monkeypatch, tmp_path):
    """Below the floor of every table multiple, auto falls back to 1 and says so (a target 1 can reach)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ct.write_table({"ort-cpu": {"multiple": 16, "measured_on": "test", "curves": {}}}, ct.user_table_path())
    analysis = graphprune.analyze(example_cnn())
    assert floor_fraction(analysis, "macs", group_multiples(analysis, 16)) > 0.1 > floor_fraction(analysis, "macs", 1)
    result = graphprune.prune(example_cnn(), target_flops=0.1, measure=False)
    assert result.report["round_to_source"].endswith("1: the table's multiples cannot reach the target)")
    assert result.report["macs"]["ratio"] <= 0.1
