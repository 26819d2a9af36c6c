"""External-data models: weights in a side file load and prune; a missing or short side file is one clear line."""
from __future__ import annotations

import hashlib
import os

import onnx
import pytest

from fuzz_cases import check_prune
from graphprune.examples import example_cnn


@pytest.fixture()
def external(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(example_cnn(image=16), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").stat().st_size > 0
    return path


def _digest(directory) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(directory))}


def test_external_data_prunes_and_is_untouched(external, tmp_path):
    before = _digest(tmp_path)
    assert check_prune(str(external), target=0.5).status == "ok"
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_broken_side_file_is_one_line(external, tmp_path, damage):
    side = tmp_path / "weights.bin"
    if damage == "missing":
        side.unlink()
    elif damage == "truncated":
        side.write_bytes(side.read_bytes()[:1000])
    else:
        side.write_bytes(b"")
    out = check_prune(str(external))
    assert out.status == "error" and ("external data" in out.message or "decode" in out.message), out.message


def test_side_file_outside_the_model_directory_is_refused(tmp_path):
    """A location like ../../etc/passwd must not be read."""
    model = example_cnn(image=16)
    inner = tmp_path / "inner"
    inner.mkdir()
    onnx.save(model, str(inner / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    m = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    os.rename(inner / "w.bin", tmp_path / "w.bin")
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    onnx.save(m, str(inner / "m.onnx"))
    out = check_prune(str(inner / "m.onnx"))
    assert out.status == "error", out
