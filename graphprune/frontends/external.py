"""External tensor data: read only from the model's own folder, write next to the output.

Why not onnx's loader: it resolves only the tensors it walks to, and tensors it skips (Constant
values, attribute tensors, subgraph initializers) were later decoded against the *current
directory*, so a model could ship `~/.ssh/id_ed25519` bytes inside a pruned output. Here every
tensor at any depth is resolved once, at load time, against the model's folder, under the rules
of onnx's loader: a relative location, no `..` component, no symlink, no hard-linked file, a
regular file inside the folder, and offset/length inside that file. Anything else is one line.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Any, Iterator

import onnx

from graphprune.errors import GraphpruneError

# tensors smaller than this stay inside the .onnx file when writing external data
EXTERNAL_MIN_BYTES = 1024
# a serialised protobuf message cannot reach 2 GiB; stay clear of the edge
PROTO_LIMIT = 2**31 - 2**24


def iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph and all its subgraphs (iterative: nesting depth is untrusted)."""
    stack: list[Any] = [graph]
    while stack:
        g = stack.pop()
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sp in attr.sparse_tensors:
                    yield sp.values
                    yield sp.indices
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: graph, subgraphs, and function bodies."""
    yield from iter_graph_tensors(model.graph)
    for fn in model.functions:
        holder = onnx.GraphProto()
        holder.node.extend(fn.node)
        yield from iter_graph_tensors(holder)


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0


def _fields(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def resolve_location(base: str, location: str, tensor: str) -> str:
    """The real path of an external-data file, or GraphpruneError if the loader rules forbid it."""
    where = f"tensor '{tensor}' external data location {location!r}"
    if not location or "\x00" in location:
        raise GraphpruneError(f"{where}: empty or invalid location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        raise GraphpruneError(f"{where}: absolute paths are not allowed (must be relative to the model's folder)")
    parts = re.split(r"[\\/]+", location)
    if ".." in parts:
        raise GraphpruneError(f"{where}: '..' is not allowed (must stay inside the model's folder)")
    base_real = os.path.realpath(base)
    path = base_real
    for part in parts:
        if part in ("", "."):
            continue
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise GraphpruneError(f"{where}: symbolic links are not allowed")
    real = os.path.realpath(path)
    if os.path.commonpath([real, base_real]) != base_real:
        raise GraphpruneError(f"{where}: resolves outside the model's folder")
    try:
        st = os.stat(real)
    except OSError:
        raise GraphpruneError(f"{where}: file not found next to the model") from None
    if not stat.S_ISREG(st.st_mode):
        raise GraphpruneError(f"{where}: not a regular file")
    if st.st_nlink > 1:
        raise GraphpruneError(f"{where}: hard-linked files are not allowed")
    return real


def _int_field(fields: dict[str, str], key: str, where: str) -> int | None:
    if key not in fields:
        return None
    value = fields[key]
    if not re.fullmatch(r"[0-9]{1,19}", value.strip()):
        raise GraphpruneError(f"{where}: {key} {value!r} is not a non-negative integer")
    return int(value)


def resolve_external_data(model: onnx.ModelProto, base: str) -> list[str]:
    """Load every external tensor (any depth) from `base` in place; return the files read."""
    files: list[str] = []
    handles: dict[str, Any] = {}
    try:
        for t in iter_tensors(model):
            if not _is_external(t):
                continue
            fields = _fields(t)
            where = f"tensor '{t.name}' external data"
            if t.data_type == onnx.TensorProto.STRING:
                raise GraphpruneError(f"{where}: string tensors cannot be stored externally")
            path = resolve_location(base, fields.get("location", ""), t.name)
            offset = _int_field(fields, "offset", where) or 0
            length = _int_field(fields, "length", where)
            size = os.path.getsize(path)
            if offset > size or (length is not None and offset + length > size):
                raise GraphpruneError(f"{where}: offset/length beyond the end of {os.path.basename(path)} "
                                      f"({size} bytes)")
            if path not in handles:
                handles[path] = open(path, "rb")
                files.append(path)
            fh = handles[path]
            fh.seek(offset)
            data = fh.read(size - offset if length is None else length)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data
    except OSError as exc:
        raise GraphpruneError(f"cannot read external data: {exc.strerror}") from None
    finally:
        for fh in handles.values():
            fh.close()
    return files


def referenced_files(model_path: str) -> list[str]:
    """Existing files a model file's external data points at (for the output gate; best effort)."""
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception:  # unreadable models are reported by the loader, not here
        return []
    base = os.path.dirname(os.path.abspath(model_path))
    out: list[str] = []
    try:
        for t in iter_tensors(model):
            if _is_external(t):
                location = _fields(t).get("location", "")
                if location and not os.path.isabs(location):
                    path = os.path.realpath(os.path.join(base, location))
                    if os.path.isfile(path) and path not in out:
                        out.append(path)
    except (UnicodeDecodeError, ValueError):
        return out
    return out
