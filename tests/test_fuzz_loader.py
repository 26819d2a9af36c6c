"""Fuzzing the ONNX loader, analysis and prune(): hostile bytes and broken-but-parsable protobufs.

Contract (tests/fuzz_cases.py): a correct result equivalent to consumer masking, or one
GraphpruneError line; never another exception, never a 'pruned model failed' for a valid input.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_cases import STRUCTURAL, check_prune, mutate_bytes, mutate_proto, save_bytes, seed_models

SEEDS = seed_models()
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(SEEDS) - 1))
def test_byte_mutations(tmp_path_factory, seed, which):
    kind, data = mutate_bytes(SEEDS[which].SerializeToString(), np.random.default_rng(seed))
    path = save_bytes(tmp_path_factory.mktemp("b") / "m.onnx", data)
    check_prune(path, target=0.5)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(SEEDS) - 1), n=st.integers(1, 3),
       target=st.floats(0.2, 0.95))
def test_structural_mutations(seed, which, n, target):
    _, model = mutate_proto(SEEDS[which], np.random.default_rng(seed), n=n)
    check_prune(model, target=target)


@FUZZ
@given(data=st.binary(min_size=0, max_size=512))
def test_arbitrary_bytes(tmp_path_factory, data):
    path = save_bytes(tmp_path_factory.mktemp("r") / "m.onnx", data)
    check_prune(path)


@pytest.mark.parametrize("kind", sorted(STRUCTURAL))
def test_every_mutator_on_every_seed(kind):
    """Each structural mutation at least once per seed, so a rare mutator is never skipped."""
    for k, seed_model in enumerate(SEEDS):
        model = onnx.ModelProto()
        model.CopyFrom(seed_model)
        try:
            STRUCTURAL[kind](model, np.random.default_rng(k))
        except (IndexError, ValueError):
            continue
        check_prune(model, target=0.6)


EXPECTED_ERRORS = {
    "dangling_input": "undefined tensor 'does_not_exist'",
    "self_loop": "cycle",
    "missing_output": "never produced",
    "no_inputs": "undefined tensor 'image'",
    "duplicate_node_names": "used by more than one node",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_ERRORS))
def test_named_structural_errors(kind):
    """Broken graphs are named precisely, not as a generic checker or runtime failure."""
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[0])
    STRUCTURAL[kind](model, np.random.default_rng(0))
    out = check_prune(model)
    assert out.status == "error" and EXPECTED_ERRORS[kind] in out.message, out.message


def test_cycle_between_nodes_is_named():
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[0])
    nodes = model.graph.node
    nodes[2].input[0] = nodes[5].output[0]  # a data edge from later in the graph back to node 2
    out = check_prune(model)
    assert out.status == "error" and "cycle" in out.message, out.message


def test_misordered_nodes_are_reordered_and_pruned():
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[0])
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    assert check_prune(model).status == "ok"


def test_valid_variants_prune_correctly():
    """Mutations that keep the model valid must be pruned, not refused."""
    for kind in ("empty_names", "nan_weights", "input_is_initializer", "extra_output"):
        model = onnx.ModelProto()
        model.CopyFrom(SEEDS[0])
        STRUCTURAL[kind](model, np.random.default_rng(1))
        out = check_prune(model, target=0.7)
        assert out.status == "ok", (kind, out.message)


REGRESSIONS = os.path.join(os.path.dirname(__file__), "fuzz_regressions")


@pytest.mark.parametrize("name", sorted(os.listdir(REGRESSIONS)))
def test_saved_fuzz_findings(name):
    """Inputs that once broke the contract (atheris finds), kept as files."""
    check_prune(os.path.join(REGRESSIONS, name))
