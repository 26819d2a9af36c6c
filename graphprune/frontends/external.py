"""External tensor data: read only from the model's own folder, write next to the output.

Why not onnx's loader: it resolves only the tensors it walks to, and tensors it skips (Constant
values, attribute tensors, subgraph initializers) were later decoded against the *current
directory*, so a model could ship `~/.ssh/id_ed25519` bytes inside a pruned output. Here every
tensor at any depth is resolved once, at load time, against the model's folder, under the rules
of onnx's loader: a relative location, no `..` component, no symlink, no hard-linked file, a
regular file inside the folder, and offset/length inside that file. Anything else is one line.
"""
from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import shutil
import stat
import tempfile
import weakref
from typing import Any, Iterator

import numpy as np
import onnx

from graphprune.errors import GraphpruneError

# tensors smaller than this stay inside the .onnx file when writing external data
EXTERNAL_MIN_BYTES = 1024
# a serialised protobuf message cannot reach 2 GiB; stay clear of the edge
PROTO_LIMIT = 2**31 - 2**24
# models whose external data reach this size keep their big weights on disk (memory-mapped), see map_tensor
MAP_MIN_TOTAL = 256 << 20
# only weights the weightless skeleton moves out (more elements than this) are mapped
MAP_MIN_ELEMENTS = 4096
# offsets in data files graphprune writes are aligned so onnxruntime can memory-map every tensor
ALIGN = 1 << 16
# marks a tensor as mapped by this process (a file cannot forge it: the value is a per-process secret)
_MAPPED_KEY = "graphprune.mapped"
_SECRET = secrets.token_hex(16)
_MAPPABLE = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
             onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
             onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16,
             onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT32: np.uint32,
             onnx.TensorProto.INT64: np.int64, onnx.TensorProto.UINT64: np.uint64}


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


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _external_total(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if _is_external(t):
            length = _fields(t).get("length", "")
            total += int(length) if length.isdigit() else _elements(t) * 4
    return total


def resolve_external_data(model: onnx.ModelProto, base: str) -> list[str]:
    """Load every external tensor (any depth) from `base` in place; return the files read.

    In a model with at least MAP_MIN_TOTAL bytes of external data, big top-level weights are not
    read: they stay on disk and are memory-mapped when used (`map_tensor`), so a 2 GB model never
    sits in memory as a 2 GB proto plus a 2 GB copy of its arrays. The same location checks apply.
    """
    files: list[str] = []
    handles: dict[str, Any] = {}
    big = _external_total(model) >= MAP_MIN_TOTAL
    try:
        for top, t in [(True, t) for t in model.graph.initializer] + [(False, t) for t in iter_tensors(model)]:
            if not _is_external(t) or is_mapped(t):
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
            if top and big and _mappable(t):
                expected = _elements(t) * np.dtype(_MAPPABLE[t.data_type]).itemsize
                if length is not None and length != expected:
                    raise GraphpruneError(f"{where}: length {length} does not match dims {list(t.dims)} "
                                          f"({expected} bytes)")
                if offset + expected > size:
                    raise GraphpruneError(f"{where}: offset/length beyond the end of {os.path.basename(path)} "
                                          f"({size} bytes)")
                _mark_mapped(t, path, offset, expected)
                if path not in files:
                    files.append(path)
                continue
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


def _mappable(t: onnx.TensorProto) -> bool:
    return _is_external(t) and t.data_type in _MAPPABLE and _elements(t) > MAP_MIN_ELEMENTS


def _mark_mapped(t: onnx.TensorProto, path: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", path), ("offset", str(offset)), ("length", str(length)), (_MAPPED_KEY, _SECRET)):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def is_mapped(t: onnx.TensorProto) -> bool:
    """A weight this process left on disk: an absolute path checked at load time (or a spill file)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == _MAPPED_KEY and e.value == _SECRET for e in t.external_data)


def has_mapped(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for t in model.graph.initializer)


def only_mapped_external(model: onnx.ModelProto) -> bool:
    """True when every external tensor of `model` is one this process mapped (a ModelProto it made)."""
    return all(is_mapped(t) for t in iter_tensors(model) if _is_external(t)) and all(
        is_mapped(t) or not _is_external(t) for t in model.graph.initializer)


# every live memory map, so their resident pages can be dropped between passes (see drop_pages)
_MAPS: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def map_tensor(t: onnx.TensorProto) -> np.ndarray:
    """A read-only memory map of a mapped tensor: no copy, pages read from the file on demand."""
    fields = _fields(t)
    dtype = np.dtype(_MAPPABLE[t.data_type]).newbyteorder("<")
    shape = tuple(int(d) for d in t.dims)
    arr = np.memmap(fields["location"], dtype=dtype, mode="r", offset=int(fields["offset"]), shape=shape)
    _MAPS[id(arr)] = arr
    return arr


def drop_pages() -> None:
    """Give back the resident pages of every memory map (they are re-read from disk if used again).

    Mapped pages count towards the process's memory until dropped; a pass that read all the
    weights (scoring, rewrite, masking) would otherwise keep a full copy's worth resident.
    """
    for arr in list(_MAPS.values()):
        mm = getattr(arr, "_mmap", None)
        if mm is not None:
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass


_SPILL_DIR: list[str] = []
_SPILL_RE = re.compile(r"^\.graphprune-(?P<host>[A-Za-z0-9]{1,16})-(?P<pid>\d{1,10})-spill-[A-Za-z0-9_]+$")


def clean_stale_spills(directory: str) -> list[str]:
    """Remove spill folders of killed runs (same host, process gone, a real folder of ours)."""
    from graphprune.atomic import stale_entries

    removed = []
    for name, path, st in stale_entries(directory, _SPILL_RE):
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            shutil.rmtree(path)
            removed.append(name)
        except OSError:
            continue
    return removed


def spill_dir() -> str:
    """This process's folder for weights computed from mapped ones (removed at exit; a killed
    run's folder is removed by the next run that needs one)."""
    if not _SPILL_DIR:
        from graphprune.atomic import temp_prefix

        clean_stale_spills(tempfile.gettempdir())
        path = tempfile.mkdtemp(prefix=temp_prefix() + "spill-")
        _SPILL_DIR.append(path)
        atexit.register(shutil.rmtree, path, True)
    return _SPILL_DIR[0]


class SpillFile:
    """An append-only data file in spill_dir(): sliced or masked copies of mapped weights go here
    instead of into memory; each becomes a mapped tensor again."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(suffix=".data", dir=spill_dir())
        self._fh = os.fdopen(fd, "wb")
        self._offset = 0

    def add(self, arr: np.ndarray, like: onnx.TensorProto) -> onnx.TensorProto:
        arr = np.ascontiguousarray(arr, dtype=np.dtype(_MAPPABLE[like.data_type]).newbyteorder("<"))
        pad = -self._offset % ALIGN
        self._fh.write(b"\0" * pad)
        self._offset += pad
        self._fh.write(memoryview(arr).cast("B"))
        self._fh.flush()
        t = onnx.TensorProto()
        t.name, t.data_type = like.name, like.data_type
        t.dims.extend(arr.shape)
        _mark_mapped(t, self.path, self._offset, arr.nbytes)
        self._offset += arr.nbytes
        return t

    def remove(self) -> None:
        self._fh.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _copy_range(src: str, offset: int, length: int, fh: Any) -> None:
    """Stream `length` bytes of `src` from `offset` into `fh` (through the page cache, not memory)."""
    with open(src, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 64 << 20))
            if not chunk:
                raise GraphpruneError(f"external data file {os.path.basename(src)} ended early")
            fh.write(chunk)
            left -= len(chunk)


def ort_session(proto: onnx.ModelProto, opts: Any) -> Any:
    """An onnxruntime CPU session for `proto`, never through one serialised message over 2 GB.

    A model with mapped weights or over the protobuf limit is written, weights as external data,
    to a folder of its own; onnxruntime memory-maps that data. Spilled weights are referenced
    where they are (no copy). The files are removed once the session exists (the maps stay valid).
    """
    import onnxruntime as ort

    if not has_mapped(proto) and serialized_size(proto) < PROTO_LIMIT:
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    drop_pages()
    fd, path = tempfile.mkstemp(suffix=".onnx", dir=spill_dir())
    os.close(fd)
    try:
        write_model(proto, path, external=True, spill_in_place=True)
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    finally:
        for leftover in (path, path + ".data"):
            try:
                os.unlink(leftover)
            except OSError:
                pass


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


def serialized_size(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def write_model(model: onnx.ModelProto, real: str, *, external: bool, gate: Any = None, shown: str | None = None,
                spill_in_place: bool = False) -> None:
    """Write `model` atomically; with external data in `<name>.data` next to it when asked, when the
    model would not fit one protobuf message, or when its weights are mapped (streamed from their
    files, never all in memory). The data file is written (atomically) first.

    spill_in_place: weights in files of the model's own folder (spill files, when the model is a
    private run copy inside spill_dir(); never for user-visible outputs) are referenced where they are.
    """
    from graphprune.atomic import atomic_write

    shown = shown or real
    mapped = has_mapped(model)
    big = not mapped and serialized_size(model) >= PROTO_LIMIT
    movable = ([t for t in model.graph.initializer if is_mapped(t) or len(t.raw_data) >= EXTERNAL_MIN_BYTES]
               if (external or big or mapped) else [])
    if not movable:
        if big:
            raise GraphpruneError(f"cannot write {shown}: model over 2 GB with no tensor that can move to external data")
        atomic_write(real, lambda fh: fh.write(model.SerializeToString()), shown=shown)
        return
    data_real = real + ".data"
    location = os.path.basename(real) + ".data"
    folder = os.path.dirname(os.path.abspath(real))
    if gate is not None:
        gate.claim(data_real, f"external data of {shown}")
    saved: list[tuple[onnx.TensorProto, bytes, list[tuple[str, str]]]] = []

    def point(t: onnx.TensorProto, where: str, offset: int, length: int) -> None:
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", where), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value

    def fill_data(fh: Any) -> None:
        offset = 0
        for t in movable:
            fields = _fields(t) if is_mapped(t) else {}
            if fields:
                saved.append((t, b"", [(e.key, e.value) for e in t.external_data]))
                src, src_offset, length = fields["location"], int(fields["offset"]), int(fields["length"])
                if spill_in_place and os.path.dirname(src) == folder:
                    point(t, os.path.basename(src), src_offset, length)
                    continue
            pad = -offset % ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            if fields:
                _copy_range(src, src_offset, length, fh)
            else:
                raw = t.raw_data
                fh.write(raw)
                saved.append((t, raw, []))
                t.ClearField("raw_data")
                length = len(raw)
            point(t, location, offset, length)
            offset += length

    try:
        atomic_write(data_real, fill_data, shown=shown + ".data")
        if serialized_size(model) >= PROTO_LIMIT:
            raise GraphpruneError(f"cannot write {shown}: over 2 GB even with its weights in external data")
        atomic_write(real, lambda fh: fh.write(model.SerializeToString()), shown=shown)
    finally:
        for t, raw, entries in saved:  # the caller's proto is left as it was
            del t.external_data[:]
            if entries:
                for key, value in entries:
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
            else:
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw
