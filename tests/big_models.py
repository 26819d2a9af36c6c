"""Large ONNX models written straight to disk, one weight at a time (never all in memory).

Used by the external-data memory tests and benchmarks/big_model_memory.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper


def conv_chain_external(path: str, channels: int, layers: int, seed: int = 0, spatial: int = 2) -> int:
    """Conv(3x3)+Relu chain of `layers` convs of `channels` channels, weights in `<path>.data`.

    Returns the size of the data file in bytes. Weights are written one at a time, so building a
    2 GB model does not take 2 GB of memory here.
    """
    rng = np.random.default_rng(seed)
    data = path + ".data"
    location = os.path.basename(data)
    inits, nodes = [], []
    offset = 0
    x = "x"
    with open(data, "wb") as fh:
        for k in range(layers):
            cin = 3 if k == 0 else channels
            w = (rng.standard_normal((channels, cin, 3, 3), dtype=np.float32) * (1.0 / np.sqrt(cin * 9))).astype("<f4")
            fh.write(w.tobytes())
            t = TensorProto()
            t.name, t.data_type = f"w{k}", TensorProto.FLOAT
            t.dims.extend(w.shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, value
            offset += w.nbytes
            inits.append(t)
            conv = f"c{k}"
            nodes.append(helper.make_node("Conv", [x, t.name], [conv], pads=[1] * 4, name=f"conv{k}"))
            if k < layers - 1:
                nodes.append(helper.make_node("Relu", [conv], [f"r{k}"], name=f"relu{k}"))
                x = f"r{k}"
            else:
                x = conv
            del w
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, spatial, spatial])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, channels, spatial, spatial])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return offset


def prune_peak_mb(model: str, out: str, target: str, tmp: str, *extra: str) -> float:
    """Peak resident memory (MB, ru_maxrss of the child) of one `graphprune MODEL --target-params T
    -o OUT [extra]` process, with TMPDIR=tmp. Raises RuntimeError with its stderr if it fails."""
    env = dict(os.environ, TMPDIR=tmp)
    args = [sys.executable, "-m", "graphprune.cli", model, "--target-params", target, "-o", out, "--json", *extra]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(err.read().decode(errors="replace")[-2000:])
    return usage.ru_maxrss / 1024  # kB on Linux
