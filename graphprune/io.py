"""Atomic output for library callers: a file is either the complete new content or untouched.

The checks and the writing live in graphprune.outputs (the one output gate); these helpers keep
the simple call form for API users who write one file without a gate.
"""
from __future__ import annotations

import os

import onnx

from graphprune.errors import GraphpruneError
from graphprune.outputs import OutputGate


def write_bytes_atomic(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> None:
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise GraphpruneError(f"output exists: {path} (pass --overwrite to replace it)")
    OutputGate(overwrite=overwrite).write_bytes(path, data)


def write_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, overwrite: bool = True,
                       external: bool | None = None) -> None:
    """Write an ONNX model; weights go to `<name>.data` next to it when asked or when over 2 GB."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise GraphpruneError(f"output exists: {path} (pass --overwrite to replace it)")
    OutputGate(overwrite=overwrite).write_model(model, path, external=bool(external))
