"""Allocation and cost model: exact targets, round_to, ignore, uniform, incremental == full recompute."""
import numpy as np
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.passes.allocate import IncrementalCost, allocate, ignored_classes
from graphprune.passes.magnitude import l1
from random_cnn import KINDS, random_cnn


@pytest.fixture(scope="module")
def analysis():
    return graphprune.analyze(example_cnn(image=32))


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_incremental_cost_matches_full_recompute(kind):
    rng = np.random.default_rng(0)
    for seed in range(5):
        an = graphprune.analyze(random_cnn(seed, list(rng.choice(KINDS, 10))))
        free = [r for g in an.prunable_groups for r in g.classes if not an.is_frozen(r)]
        cost = IncrementalCost(an, kind)
        removed = set()
        for r in rng.permutation(free)[: len(free) // 2]:
            cost.remove(int(r))
            removed.add(int(r))
        assert cost.total == pytest.approx(an.cost(kind, removed), rel=1e-9)
        for r in list(removed)[::2]:
            cost.restore(r)
            removed.discard(r)
        assert cost.total == pytest.approx(an.cost(kind, removed), rel=1e-9)


@pytest.mark.parametrize("target", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("kind", ["macs", "params"])
def test_targets_are_met_tightly(analysis, target, kind):
    plan = allocate(analysis, l1(analysis), target=target, kind=kind)
    assert plan.achieved <= target + 1e-12
    assert target - plan.achieved <= 0.02  # a tiny model has coarse channels; zoo tests check 0.5%


def test_round_to_keeps_multiples(analysis):
    plan = allocate(analysis, l1(analysis), target=0.5, round_to=4)
    for gid, (kept, total) in plan.kept.items():
        g = analysis.groups[gid]
        if not g.frozen and kept != total:
            assert kept % 4 == 0 and kept >= 4


def test_ignore_protects_matching_layers(analysis):
    conv = next(n.name for n in analysis.graph.nodes if n.op_type == "Conv" and n.name != "Conv_3")
    protected = ignored_classes(analysis, [conv])
    assert protected
    plan = allocate(analysis, l1(analysis), target=0.8, protected=protected)
    assert not (plan.removed & protected)


def test_uniform_prunes_groups_alike(analysis):
    plan = allocate(analysis, l1(analysis), target=0.5, strategy="uniform")
    fractions = [k / t for gid, (k, t) in plan.kept.items() if not analysis.groups[gid].frozen]
    assert max(fractions) - min(fractions) < 0.5
    assert plan.achieved <= 0.5


def test_unreachable_target_is_a_clear_error(analysis):
    with pytest.raises(graphprune.GraphpruneError, match="not reachable"):
        allocate(analysis, l1(analysis), target=0.001)
