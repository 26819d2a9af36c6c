"""MAC count of an ONNX model, from the dependency analysis' cost model.

One counter for the whole project: the FLOPs ratio printed next to a measured speed-up is the
same number the allocator targets (Conv, ConvTranspose, Gemm, MatMul, including frozen ones).
"""
from __future__ import annotations

from pathlib import Path

import onnx


def count_macs(model: onnx.ModelProto | str | Path, input_shape: dict[str, tuple[int, ...]] | None = None) -> int:
    """Multiply-accumulates of one inference (dynamic batch counted as 1, other dynamic dims from input_shape)."""
    from graphprune.analysis.groups import analyze_graph
    from graphprune.frontends.onnx_frontend import load_onnx

    source = str(model) if isinstance(model, Path) else model
    return int(round(analyze_graph(load_onnx(source, input_shape).graph).macs()))
