"""The core correctness check: a pruned model equals the original with removed channels' consumers zeroed."""
import numpy as np
import pytest

import graphprune
from graphprune.frontends.onnx_frontend import load_onnx
from graphprune.rewrite.masking import mask_consumers_onnx
from graphprune.rewrite.validate import random_feed, run_onnx
from test_byte_identity import check_onnx_digest
from zoo import export, max_rel_diff

pytest.importorskip("torch")

MODELS = ["resnet50", "mobilenet_v3_large", "densenet121", "googlenet", "efficientnet_b0",
          "regnet_y_400mf", "shufflenet_v2_x1_0"]


def check_equivalence(path: str, **prune_kwargs) -> graphprune.PruneResult:
    result = graphprune.prune(path, **prune_kwargs)
    loaded = load_onnx(path)
    feed = random_feed(loaded.proto, loaded.graph, seed=7)
    original = run_onnx(loaded.proto, feed)[0]
    masked = run_onnx(mask_consumers_onnx(loaded.proto, result.analysis, result.plan.removed), feed)[0]
    pruned = run_onnx(result.model, feed)[0]
    assert pruned.shape == original.shape
    assert np.abs(pruned - masked).max() < 1e-4, np.abs(pruned - masked).max()
    # the check must be able to fail: pruning really changed the function
    assert max_rel_diff(original, pruned) > 1e-3
    return result


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["l1", "fpgm"])
def test_consumer_zeroing_equivalence(name, method, zoo_dir):
    path = export(name, zoo_dir)
    result = check_equivalence(path, target_flops=0.4, method=method)
    # --round-to auto keeps groups at multiples of 16 (RegNet's 16-channel conv groups stay whole), so
    # the plan moves in coarser steps than single channels: 1 point, as in test_onnx_zoo
    assert abs(result.report["achieved"] - 0.4) <= 0.01
    check_onnx_digest(name, method, path, result)  # byte-identical to the recorded results


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v3_large"])
def test_uniform_round_to_equivalence(name, zoo_dir):
    result = check_equivalence(export(name, zoo_dir), target_flops=0.5, strategy="uniform", round_to=8)
    assert abs(result.report["achieved"] - 0.5) <= 0.005
    for g in result.report["groups"]:
        if not g["frozen"] and g["kept"] != g["channels"]:
            assert g["kept"] % 8 == 0, g


def test_bn_scale_on_unfolded_export(zoo_dir):
    path = export("resnet18", zoo_dir, fold=False)
    result = check_equivalence(path, target_flops=0.4, method="bn_scale")
    assert result.report["macs"]["ratio"] <= 0.4


def test_shuffle_chunk_bounds_follow_pruning(zoo_dir):
    """round_to 8 keeps a whole chunk() half while its block's other half is pruned: the first Slice's
    bounds, computed at run time from the pruned Shape, must become constants (used to read 0:45 of 90
    instead of the 58 kept passthrough channels, and the channel-shuffle Gather then indexed past the end)."""
    result = check_equivalence(export("shufflenet_v2_x1_0", zoo_dir), target_flops=0.4, round_to=8)
    assert abs(result.report["achieved"] - 0.4) <= 0.01
