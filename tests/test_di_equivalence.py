"""The incremental DI search (issue 20) must produce exactly the plans of the original search.

`tests/di_reference.py` is a frozen copy of the original implementation (one matrix inverse per
removed channel); both searches get the same pooled feature maps and labels here.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import di_reference as ref
import graphprune
from graphprune.examples import example_cnn
from graphprune.passes import di
from graphprune.passes.channels import from_analysis
from random_cnn import random_cnn


def _labels(x: np.ndarray, k: int) -> np.ndarray:
    """k roughly balanced classes from a data statistic (any labelling works for the comparison)."""
    s = x.reshape(len(x), -1)[:, ::7].mean(1)
    return np.searchsorted(np.quantile(s, np.linspace(0, 1, k + 1)[1:-1]), s)


def _compare(model, x: np.ndarray, y: np.ndarray, target: float, batch_size: int) -> frozenset[int]:
    an = graphprune.analyze(model)
    space = from_analysis(an)
    feats = ref.onnx_features(model, an, x, batch_size=batch_size)
    old = ref.di_greedy_plan(space, feats, y, target)
    new = di.di_greedy_plan(space, feats, y, target)
    assert new == old
    assert an.macs(old) <= target * an.macs() * (1 + 1e-9)
    return old


def test_plan_equals_reference_on_builtin_example() -> None:
    m = example_cnn()
    x = np.random.default_rng(0).normal(size=(40, 3, 32, 32)).astype(np.float32)
    plan = _compare(m, x, _labels(x, 4), 0.4, batch_size=40)
    assert len(plan) > 50


@pytest.mark.parametrize("seed", [3, 11])
def test_plan_equals_reference_on_random_dag(seed: int) -> None:
    steps = ["conv", "residual", "depthwise", "concat", "se", "split", "conv", "grouped", "conv", "slice", "conv"]
    m = random_cnn(seed, steps)
    x = np.random.default_rng(seed).normal(size=(48, 3, 8, 8)).astype(np.float32)
    _compare(m, x, _labels(x, 3), 0.5, batch_size=1)  # static batch 1: one sample per run
