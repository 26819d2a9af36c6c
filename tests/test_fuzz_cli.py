"""The CLI under hostile inputs: exit 0 with a valid model, or exit 2, one stderr line, no output file.

Most cases go through click's CliRunner (in-process, fast); a few through a real subprocess to
check that nothing (tracebacks, runtime logs, warnings) leaks onto stderr.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_cases import mutate_bytes, mutate_proto, seed_models
from graphprune.cli import main

SEEDS = seed_models()


def cli_contract(src: str, out_dir: str, *extra: str) -> int:
    """Run the CLI in-process and check the contract; returns the exit code."""
    out = os.path.join(out_dir, "slim.onnx")
    result = CliRunner().invoke(main, [src, "--target-flops", "0.5", "-o", out, "--json", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2), (result.exit_code, result.stderr)
    if result.exit_code == 2:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), result.stderr
        assert not lines[0].startswith("graphprune: error: pruned model"), lines[0]
        assert not os.path.exists(out)
    else:
        onnx.checker.check_model(onnx.load(out))
    assert not [f for f in os.listdir(out_dir) if f.startswith(".graphprune-")], "temporary file left behind"
    return result.exit_code


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), which=st.integers(0, len(SEEDS) - 1), as_bytes=st.booleans())
def test_cli_on_mutated_models(tmp_path_factory, seed, which, as_bytes):
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("cli")
    src = os.path.join(d, "in.onnx")
    if as_bytes:
        _, data = mutate_bytes(SEEDS[which].SerializeToString(), rng)
    else:
        _, model = mutate_proto(SEEDS[which], rng, n=int(rng.integers(1, 3)))
        data = model.SerializeToString()
    with open(src, "wb") as fh:
        fh.write(data)
    cli_contract(src, str(d))
    with open(src, "rb") as fh:
        assert fh.read() == data  # the input is never touched


@pytest.mark.parametrize("shape, code", [
    (None, 2),                    # dynamic H, W and no --input-shape: a clear request for one
    ("1,3,16,16", 0),
    ("image=2,3,16,16", 0),
    ("1x3x16x16", 0),
    ("1,4,16,16", 2),             # contradicts the model's fixed channel count
    ("1,3,16", 2),                # wrong rank
    ("other=1,3,16,16;x=1,3,16,16", 2),
    ("1,3,a,16", 2),
    ("1,3,0,16", 2),
])
def test_dynamic_spatial_dims_via_cli(tmp_path, shape, code):
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[0])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims[2:], "HW"):
        d.Clear()
        d.dim_param = name
    src = str(tmp_path / "dyn.onnx")
    onnx.save(model, src)
    extra = ("--input-shape", shape) if shape else ()
    assert cli_contract(src, str(tmp_path), *extra) == code
    if code == 0:
        slim = onnx.load(str(tmp_path / "slim.onnx"))
        kept = [d.dim_param for d in slim.graph.input[0].type.tensor_type.shape.dim]
        assert kept[2:] == ["H", "W"], kept  # the output keeps the dynamic signature


@pytest.mark.parametrize("case", ["truncated", "random", "cycle", "missing_init", "unknown_op"])
def test_cli_subprocess_stderr_is_one_line(tmp_path, case):
    """A real process: no traceback, ORT log line or Python warning reaches stderr."""
    src = tmp_path / "in.onnx"
    data = SEEDS[0].SerializeToString()
    model = onnx.ModelProto()
    model.CopyFrom(SEEDS[0])
    if case == "truncated":
        src.write_bytes(data[: len(data) // 2])
    elif case == "random":
        src.write_bytes(np.random.default_rng(0).bytes(2048))  # reproducible: a failure reruns
    else:
        kind = {"cycle": "cycle", "missing_init": "missing_initializer", "unknown_op": "unknown_op"}[case]
        from fuzz_cases import STRUCTURAL

        STRUCTURAL[kind](model, np.random.default_rng(2))
        onnx.save(model, src)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "graphprune.cli", str(src), "--target-flops", "0.5", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:"), proc.stderr
    assert not out.exists()
