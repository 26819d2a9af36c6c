"""Atomic output: a model file is either the complete new model or untouched, never half-written."""
from __future__ import annotations

import os
import tempfile

import onnx

from graphprune.errors import GraphpruneError


def write_bytes_atomic(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise GraphpruneError(f"output directory does not exist: {directory}")
    if os.path.exists(path) and not overwrite:
        raise GraphpruneError(f"output exists: {path} (pass --overwrite to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=".graphprune-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, overwrite: bool = True) -> None:
    data = model.SerializeToString()
    if len(data) >= 2**31 - 1:
        raise GraphpruneError("model over 2 GB: external-data output is not supported yet")
    write_bytes_atomic(data, path, overwrite=overwrite)
