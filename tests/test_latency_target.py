"""--target-latency: allocation over a measured per-layer latency model instead of MACs."""
import numpy as np
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.passes.latency_cost import latency_cost_terms
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.validate import random_feed, run_onnx


def test_latency_terms_sum_to_measured_latency():
    loaded = load_onnx(example_cnn(image=64))
    analysis = graphprune.analyze(example_cnn(image=64))
    terms, info = latency_cost_terms(analysis, loaded, runs=3)
    assert info["layers"] == len(analysis.mac_terms)
    assert abs(sum(b for b, _ in terms) - info["measured_ms"]) < 1e-6 * max(1.0, info["measured_ms"])
    assert any(ts for _, ts in terms)  # some latency scales with channels


def test_target_latency_prunes_equivalently_and_reports_measured_latency():
    model = example_cnn(image=64)
    result = graphprune.prune(model, target_latency=0.5)
    assert result.plan.kind == "latency"
    lat = result.report["latency"]
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0
    # "achieved" is the measured ratio; the cost model's prediction is reported next to it
    assert result.report["achieved"] == lat["ratio"] == pytest.approx(lat["after_ms"] / lat["before_ms"])
    assert lat["predicted_ratio"] == pytest.approx(result.plan.achieved)
    tries = lat["calibration"]
    assert 1 <= len(tries) <= 3 and tries[0]["model_target"] == 0.5
    assert lat["ratio"] in [t["measured_ratio"] for t in tries] or any(
        abs(lat["ratio"] - t["measured_ratio"]) < 1e-4 for t in tries)
    loaded = load_onnx(model)
    feed = random_feed(loaded.proto, loaded.graph, seed=2)
    masked = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    np.testing.assert_allclose(run_onnx(result.model, feed)[0], masked, atol=1e-4)
