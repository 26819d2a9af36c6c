"""Atomic output: a model file is either the complete new model or untouched, never half-written."""
from __future__ import annotations

import os
import tempfile

import onnx

from graphprune.errors import GraphpruneError


def _target_mode(path: str) -> int:
    """Keep an existing file's permissions; a new file gets 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (a crash right after must not bring the old file back)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, overwrite: bool = True) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise GraphpruneError(f"output directory does not exist: {directory}")
    if os.path.exists(path) and not overwrite:
        raise GraphpruneError(f"output exists: {path} (pass --overwrite to replace it)")
    fd, tmp = tempfile.mkstemp(prefix=".graphprune-", suffix=".tmp", dir=directory)
    try:
        # mkstemp makes 0600 files; the output gets the mode a plain open() would give it
        os.chmod(tmp, _target_mode(path))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
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
