"""ONNX frontend: load and validate a model file, normalise it, and lower it into the IR.

Normalisation (Constant nodes become initializers, symbolic batch dims are pinned for analysis)
happens on a private copy; the rewrite later edits that same normalised copy, never the input file.
"""
from __future__ import annotations

import copy
import heapq
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from graphprune.errors import GraphpruneError
from graphprune.frontends.fold import fold_bounds
from graphprune.ir.graph import Graph, Node

BATCH_DIM_NAMES = {"n", "N", "batch", "batch_size", "batchsize", "b", "B"}


@dataclass
class LoadedModel:
    """The normalised ModelProto (what gets rewritten) and its IR (what gets analysed)."""

    proto: onnx.ModelProto
    graph: Graph
    source: str | None = None


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Read an ONNX model from disk (or copy a proto), turning every failure into one clear line."""
    if isinstance(source, onnx.ModelProto):
        return copy.deepcopy(source), None
    path = os.fspath(source)
    if not os.path.exists(path):
        raise GraphpruneError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise GraphpruneError(f"input path is a directory, expected an .onnx file: {path}")
    if os.path.getsize(path) == 0:
        raise GraphpruneError(f"input file is empty: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types for corrupt bytes
        raise GraphpruneError(f"not a valid ONNX file (corrupt or truncated): {path} ({type(exc).__name__})") from None
    if not model.HasField("graph") or len(model.graph.node) == 0:
        raise GraphpruneError(f"not a valid ONNX model (no graph nodes): {path}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as exc:
            raise GraphpruneError(f"cannot load external data of {path}: {exc}") from None
    return model, path


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """Decode a tensor, turning unknown data types and size/dims mismatches into one clear line."""
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # KeyError (bad data_type), ValueError (data does not fill dims), ...
        raise GraphpruneError(
            f"cannot decode tensor '{t.name}' (data_type {t.data_type}, dims {list(t.dims)}): {type(exc).__name__}"
        ) from None


def _attr_value(attr: onnx.AttributeProto):
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return tensor_to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every constant one home the rewriter can slice.

    Constant nodes and Identity-of-constant become initializers, and a float initializer read by
    several ops is copied per reader: exporters de-duplicate equal tensors (e.g. zero biases),
    and a shared tensor would otherwise couple unrelated layers' channels.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep = []
    for node in graph.node:
        if node.domain in ("", "ai.onnx") and len(node.output) == 1:
            if node.op_type == "Constant":
                value = _constant_value(node)
                if value is not None:
                    tensor = numpy_helper.from_array(value, node.output[0])
                    graph.initializer.append(tensor)
                    inits[tensor.name] = tensor
                    continue
            if node.op_type == "Identity" and node.input and node.input[0] in inits:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(inits[node.input[0]])
                tensor.name = node.output[0]
                graph.initializer.append(tensor)
                inits[tensor.name] = tensor
                continue
        keep.append(node)
    readers: dict[str, int] = {}
    for node in keep:
        for i in node.input:
            if i in inits:
                readers[i] = readers.get(i, 0) + 1
    seen: dict[str, int] = {}
    for node in keep:
        for k, i in enumerate(node.input):
            t = inits.get(i)
            if t is None or readers[i] < 2 or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
                continue
            n = seen.get(i, 0)
            seen[i] = n + 1
            if n == 0:
                continue
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(t)
            copy_.name = f"{i}__gp{n}"
            graph.initializer.append(copy_)
            node.input[k] = copy_.name
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    # initializers listed as graph inputs (old exporters) are constants, not user inputs
    init_names = {t.name for t in graph.initializer}
    real_inputs = [i for i in graph.input if i.name not in init_names]
    if len(real_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(real_inputs)
    return model


def _check_structure(model: onnx.ModelProto) -> None:
    """Reject dangling inputs, duplicate outputs and cycles before anything else looks at the graph."""
    graph = model.graph
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    produced: set[str] = set()
    for node in graph.node:
        for out in node.output:
            if out and (out in produced or out in known):
                raise GraphpruneError(f"invalid ONNX graph: tensor '{out}' is produced twice")
            if out:
                produced.add(out)
    names = [n.name for n in graph.node if n.name]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise GraphpruneError(f"invalid ONNX graph: node name '{dup}' is used by more than one node")
    available = set(known)
    nodes = list(graph.node)
    # Kahn's algorithm (linear; a heap keeps the file's order wherever it is already valid): ONNX
    # requires topological order, but misordered files are tolerated; a cycle or a missing tensor
    # leaves nodes that can never run.
    waiting: dict[str, list[int]] = {}
    blocked = [0] * len(nodes)
    for k, node in enumerate(nodes):
        needs = {i for i in node.input if i not in available}
        blocked[k] = len(needs)
        for i in needs:
            waiting.setdefault(i, []).append(k)
    ready = [k for k in range(len(nodes)) if blocked[k] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for o in node.output:
            if o and o not in available:
                available.add(o)
                for k in waiting.pop(o, ()):
                    blocked[k] -= 1
                    if blocked[k] == 0:
                        heapq.heappush(ready, k)
    pending = [n for k, n in enumerate(nodes) if blocked[k] > 0]
    if pending:
        # a tensor nobody produces is the root cause; otherwise the stuck nodes wait on each other
        for node in pending:
            for i in node.input:
                if i not in available and i not in produced:
                    raise GraphpruneError(
                        f"invalid ONNX graph: node '{node.name or node.op_type}' reads undefined tensor '{i}'"
                    )
        node = pending[0]
        raise GraphpruneError(f"invalid ONNX graph: cycle through node '{node.name or node.op_type}'")
    for out in graph.output:
        if out.name not in available:
            raise GraphpruneError(f"invalid ONNX graph: output '{out.name}' is never produced")
    if len(ordered) == len(nodes) and any(a is not b for a, b in zip(ordered, nodes)):
        reordered = [copy.deepcopy(n) for n in ordered]
        del graph.node[:]
        graph.node.extend(reordered)


def _check_inputs(model: onnx.ModelProto) -> None:
    """Every user input must be a numeric tensor we can feed: the validation run builds one of each."""
    if not model.graph.input:
        raise GraphpruneError("invalid ONNX graph: the model has no inputs")
    if not model.graph.output:
        raise GraphpruneError("invalid ONNX graph: the model has no outputs")
    for inp in model.graph.input:
        if not inp.type.HasField("tensor_type"):
            raise GraphpruneError(f"input '{inp.name}' is not a tensor; only tensor inputs are supported")
        elem = inp.type.tensor_type.elem_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(elem)
        except (KeyError, ValueError, TypeError):
            dtype = None
        if dtype is None or not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
            raise GraphpruneError(f"input '{inp.name}' has unsupported element type {elem}")


def pin_input_shapes(model: onnx.ModelProto, input_shape: dict[str, tuple[int, ...]] | None,
                     n_inputs: int | None = None) -> onnx.ModelProto:
    """Return a copy whose graph inputs have static dims: symbolic batch -> 1, others from input_shape.

    Only used for analysis: the written model keeps its original (dynamic) input signature.
    """
    pinned = copy.deepcopy(model)
    real_inputs = list(pinned.graph.input)[:n_inputs] if n_inputs is not None else list(pinned.graph.input)
    names = [i.name for i in real_inputs]
    positional = {f"#{k}": n for k, n in enumerate(names)}
    for key in input_shape or {}:
        # "" means "the single input", "#k" the k-th input (unnamed CLI parts); others name an input
        if key == "" and len(real_inputs) != 1:
            raise GraphpruneError(
                f"the model has {len(real_inputs)} inputs ({', '.join(names)}); name them in --input-shape, "
                "e.g. 'input=1,3,224,224;mask=1,1,224,224'"
            )
        if key and key not in names and key not in positional and len(real_inputs) != 1:
            raise GraphpruneError(f"--input-shape names '{key}', which is not a model input ({', '.join(names)})")
    by_name = {positional.get(k, k): v for k, v in (input_shape or {}).items()}
    for inp in real_inputs:
        ttype = inp.type.tensor_type
        override = by_name.get(inp.name)
        if override is None and input_shape and len(input_shape) == 1 and len(real_inputs) == 1:
            override = next(iter(input_shape.values()))
        if not ttype.HasField("shape"):
            if override is None:
                raise GraphpruneError(f"input '{inp.name}' has no shape; pass --input-shape")
            ttype.shape.dim.add()  # rank unknown: take the given shape as is
            del ttype.shape.dim[:]
            ttype.shape.dim.extend(onnx.TensorShapeProto.Dimension(dim_value=int(v)) for v in override)
        dims = ttype.shape.dim
        if override is not None:
            if len(override) != len(dims):
                raise GraphpruneError(
                    f"--input-shape for '{inp.name}' has rank {len(override)}, the model input has rank {len(dims)}"
                )
            for axis, (d, v) in enumerate(zip(dims, override)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != int(v):
                    raise GraphpruneError(
                        f"--input-shape for '{inp.name}' sets axis {axis} to {v}, the model fixes it to {d.dim_value}"
                    )
            for d, v in zip(dims, override):
                d.Clear()
                d.dim_value = int(v)
            continue
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            if axis == 0:
                d.Clear()
                d.dim_value = 1
            else:
                name = d.dim_param or "?"
                raise GraphpruneError(
                    f"input '{inp.name}' has dynamic dim '{name}' at axis {axis}; "
                    "pass --input-shape (e.g. 1,3,224,224) to analyse it"
                )
    return pinned


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            return None
    return tuple(dims)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise GraphpruneError(f"ONNX shape inference failed: {str(exc).splitlines()[0][:200]}") from None


def to_ir(model: onnx.ModelProto, n_inputs: int | None = None,
          moved: dict[str, onnx.TensorProto] | None = None) -> Graph:
    """Lower a shape-inferred, normalised ModelProto (or its skeleton plus the moved weights) into the IR."""
    g = model.graph
    constants = {t.name: tensor_to_array(t) for t in g.initializer}
    for name, t in (moved or {}).items():
        constants[name] = tensor_to_array(t)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _shape_of(vi)
        if s is not None:
            shapes[vi.name] = s
    nodes = []
    used_names: set[str] = set()
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if name in used_names:
            name = f"{name}_{i}"
        used_names.add(name)
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        nodes.append(Node(name, n.op_type, list(n.input), list(n.output), attrs, n.domain))
    return Graph(
        nodes=nodes,
        shapes=shapes,
        constants=constants,
        inputs=[i.name for i in g.input][:n_inputs] if n_inputs is not None else [i.name for i in g.input],
        outputs=[o.name for o in g.output],
        name=g.name or "graph",
    )


def skeleton(model: onnx.ModelProto, limit: int = 4096) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A weightless copy for checker and shape inference (serialising 500 MB of weights costs seconds).

    Large initializers become graph inputs of the same type and shape; small ones (shape
    constants, which inference needs by value) stay. Returns the copy and the moved arrays.
    """
    light = onnx.ModelProto()
    graph = model.graph
    moved: dict[str, onnx.TensorProto] = {}
    kept_inits = []
    for t in graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        if n > limit:
            moved[t.name] = t
        else:
            kept_inits.append(t)
    # build the light model field by field so the big tensors are never copied
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.producer_name = model.producer_name
    light.functions.extend(model.functions)
    g = light.graph
    g.name = graph.name
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    g.initializer.extend(kept_inits)
    for name, t in moved.items():
        g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return light, {name: t for name, t in moved.items()}


def probe_shapes(model: onnx.ModelProto, pinned: onnx.ModelProto, known: set[str]) -> dict[str, tuple[int, ...]]:
    """Shapes ONNX inference could not derive (data-dependent pads, computed reshapes), read off one
    onnxruntime run. Best effort: models ORT cannot run (custom ops) keep those tensors unknown."""
    missing = [o for n in model.graph.node for o in n.output if o and o not in known]
    if not missing:
        return {}
    try:
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.input[:]
        probe.graph.input.extend(pinned.graph.input[: len(model.graph.input)])
        for name in missing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {}
        for inp in probe.graph.input:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            feed[inp.name] = (rng.standard_normal(dims) if np.issubdtype(dtype, np.floating)
                              else np.zeros(dims)).astype(dtype)
        values = sess.run(missing, feed)
    except Exception:
        return {}
    return {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(missing, values)}


def load_onnx(
    source: str | os.PathLike | onnx.ModelProto, input_shape: dict[str, tuple[int, ...]] | None = None
) -> LoadedModel:
    """Load, validate and lower an ONNX model. Raises GraphpruneError with one line on bad input."""
    model, path = read_model(source)
    try:
        return _load_checked(model, path, input_shape)
    except UnicodeDecodeError:  # protobuf decodes string fields lazily, on first access
        raise GraphpruneError(f"not a valid ONNX file: a name or string field is not valid UTF-8 ({path})") from None


def _load_checked(model: onnx.ModelProto, path: str | None,
                  input_shape: dict[str, tuple[int, ...]] | None) -> LoadedModel:
    # structure first: misordered nodes are reordered, cycles and dangling tensors get a precise message
    model = normalize(model)
    _check_structure(model)
    _check_inputs(model)
    light, _ = skeleton(model)
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "invalid model"
        raise GraphpruneError(f"ONNX checker rejected the model: {first}") from None
    except Exception as exc:
        raise GraphpruneError(f"ONNX checker rejected the model: {type(exc).__name__}") from None
    light, moved = skeleton(model)
    n_real = len(model.graph.input)
    pinned = pin_input_shapes(light, input_shape, n_inputs=n_real)
    analysed = infer_shapes(pinned)
    graph = to_ir(analysed, n_inputs=n_real, moved=moved)
    for name, shape in probe_shapes(model, pinned, set(graph.shapes)).items():
        graph.shapes.setdefault(name, shape)
    fold_bounds(graph)
    # the IR's node names must match the proto's, so the rewriter can find nodes by index
    return LoadedModel(proto=model, graph=graph, source=path)


def _interface(model: onnx.ModelProto) -> tuple[list[tuple], list[tuple]]:
    inits = {i.name for i in model.graph.initializer}

    def sig(vi: onnx.ValueInfoProto, with_shape: bool) -> tuple:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tt.shape.dim)
        return (vi.name, onnx.TensorProto.DataType.Name(tt.elem_type), dims if with_shape else len(dims))

    return ([sig(i, True) for i in model.graph.input if i.name not in inits],
            [sig(o, False) for o in model.graph.output])


def interface_mismatch(a: onnx.ModelProto, b: onnx.ModelProto) -> str | None:
    """Why two models cannot be compared as drop-in replacements (inputs: name, type, shape; outputs:
    name, type, rank), or None when they can. A pruned model keeps its original's interface."""
    (ia, oa), (ib, ob) = _interface(a), _interface(b)
    if ia != ib:
        return f"inputs differ: {ia} vs {ib}"
    if oa != ob:
        return f"outputs differ: {oa} vs {ob}"
    return None
