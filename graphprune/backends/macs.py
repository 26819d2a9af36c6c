"""MAC count of an ONNX model, from the dependency analysis' cost model.

One counter for the whole project: the FLOPs ratio printed next to a measured speed-up is the
same number the allocator targets (Conv, ConvTranspose, Gemm, MatMul, including frozen ones).
"""
from __future__ import annotations

from pathlib import Path

import onnx


def count_macs(model: onnx.ModelProto | str | Path, input_shape: dict[str, tuple[int, ...]] | None = None) -> int:
    """Multiply-accumulates of one inference (dynamic batch counted as 1, other dynamic dims from input_shape)."""
    from graphprune.api import analyze

    return int(round(analyze(str(model) if isinstance(model, Path) else model, input_shape=input_shape).macs()))
