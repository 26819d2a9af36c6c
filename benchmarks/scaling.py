"""Analysis time and memory vs graph size: the dependency analysis must stay linear.

    python benchmarks/scaling.py [--sizes 1000,5000,10000,50000]

Builds a synthetic CNN of about N nodes with onnx.helper (blocks of conv/relu/residual add and a
two-branch concat), writes it, then times analysis alone and load+analysis, and reports the peak
resident memory of a fresh process per size (so sizes do not inflate each other's peak).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def synthetic_cnn(n_nodes: int, channels: int = 8, image: int = 4, seed: int = 0) -> onnx.ModelProto:
    """About n_nodes ops: residual blocks (Conv, Relu, Conv, Add, Relu) and concat blocks
    (Conv, Conv, Concat, Relu); the channel count stays `channels` throughout."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    c, half = channels, channels // 2

    def conv(x: str, cin: int, cout: int) -> str:
        k = len(nodes)
        w = numpy_helper.from_array(rng.standard_normal((cout, cin, 1, 1)).astype(np.float32), f"w{k}")
        b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), f"b{k}")
        inits.extend([w, b])
        nodes.append(helper.make_node("Conv", [x, w.name, b.name], [f"t{k}"], name=f"conv{k}"))
        return f"t{k}"

    def op(op_type: str, inputs: list[str], **attrs) -> str:
        k = len(nodes)
        nodes.append(helper.make_node(op_type, inputs, [f"t{k}"], name=f"{op_type.lower()}{k}", **attrs))
        return f"t{k}"

    x = op("Relu", [conv("input", 3, c)])
    block = 0
    while len(nodes) < n_nodes - 3:
        if block % 3 == 2:
            left, right = conv(x, c, half), conv(x, c, c - half)
            x = op("Relu", [op("Concat", [left, right], axis=1)])
        else:
            y = conv(op("Relu", [conv(x, c, c)]), c, c)
            x = op("Relu", [op("Add", [x, y])])
        block += 1
    x = op("GlobalAveragePool", [x])
    nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        nodes, f"synthetic_{n_nodes}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image, image])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", c, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def measure(path: str) -> dict[str, float]:
    """Time load+analysis and analysis alone of the model at `path` (in this process)."""
    from graphprune.analysis.groups import analyze_graph
    from graphprune.frontends.onnx_frontend import load_onnx

    t0 = time.perf_counter()
    loaded = load_onnx(path)
    t1 = time.perf_counter()
    analysis = analyze_graph(loaded.graph)
    t2 = time.perf_counter()
    return {
        "nodes": len(loaded.graph.nodes),
        "groups": len(analysis.groups),
        "prunable": len(analysis.prunable_groups),
        "load_s": t1 - t0,
        "analysis_s": t2 - t1,
        "load_analysis_s": t2 - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000,50000")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: measure one file
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = os.path.join(tmp, f"synthetic_{n}.onnx")
            onnx.save(synthetic_cnn(n), path)
            out = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'nodes':>7} {'groups':>7} {'analysis s':>11} {'load+analysis s':>16} {'us/node':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['nodes']:>7} {r['groups']:>7} {r['analysis_s']:>11.3f} {r['load_analysis_s']:>16.3f} "
              f"{1e6 * r['analysis_s'] / r['nodes']:>8.1f} {r['peak_rss_mib']:>13.0f}")
    worst = max(r["peak_rss_mib"] for r in rows)
    print(f"peak RSS {worst:.0f} MiB ({'below' if worst < 2048 else 'ABOVE'} the 2 GiB limit)")


if __name__ == "__main__":
    main()
