"""MAC count of an ONNX model, from the dependency analysis' cost model.

One counter for the whole project: the FLOPs ratio printed next to a measured speed-up is the
same number the allocator targets (Conv, ConvTranspose, Gemm, MatMul, including frozen ones).
"""
from __future__ import annotations

from pathlib import Path

import onnx


def count_macs(model: onnx.ModelProto | str | Path) -> int:
    """Multiply-accumulates of one inference (dynamic batch counted as 1)."""
    from graphprune.analysis.groups import analyze_graph
    from graphprune.frontends.onnx_frontend import load_onnx

    return int(round(analyze_graph(load_onnx(str(model) if isinstance(model, Path) else model).graph).macs()))
