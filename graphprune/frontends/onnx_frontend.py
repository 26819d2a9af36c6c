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
from graphprune.frontends.external import ort_session
from graphprune.frontends.fold import (fold_bounds, fold_constant_nodes, fold_dequantized_weights, fold_graph_constants,
                                       shape_value)
from graphprune.ir.graph import Graph, Node

BATCH_DIM_NAMES = {"n", "N", "batch", "batch_size", "batchsize", "b", "B"}


@dataclass
class LoadedModel:
    """The normalised ModelProto (what gets rewritten) and its IR (what gets analysed)."""

    proto: onnx.ModelProto
    graph: Graph
    source: str | None = None


def compared_constants(proto: onnx.ModelProto) -> dict[str, list[float]]:
    """Per graph input: the constants the model compares it with (Equal, possibly after a Cast),
    at any depth. A scalar such as a sample rate that must be 8000 or 16000 is fed one of these."""
    consts = {t.name: t for t in proto.graph.initializer}
    found: dict[str, list[float]] = {}
    inputs = {i.name for i in proto.graph.input}

    def walk(graph: onnx.GraphProto, alias: dict[str, str]) -> None:
        local = dict(alias)
        for n in graph.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        consts[n.output[0]] = a.t
            if n.op_type in ("Cast", "Identity", "Squeeze", "Reshape") and n.input and n.input[0] in local:
                local[n.output[0]] = local[n.input[0]]
            if n.op_type == "Equal" and len(n.input) == 2:
                for x, c in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
                    if x in local and c in consts:
                        value = onnx.numpy_helper.to_array(consts[c]).ravel()
                        if value.size == 1:
                            found.setdefault(local[x], []).append(float(value[0]))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, local)

    walk(proto.graph, {i: i for i in inputs})
    return found


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """Read an ONNX model from disk (or copy a proto), turning every failure into one clear line."""
    if isinstance(source, onnx.ModelProto):
        from graphprune.frontends.external import only_mapped_external

        # weights this process mapped (a slim model it returned) are fine; any other reference is not
        if not only_mapped_external(source):
            # no folder to resolve against; never fall back to the current directory
            raise GraphpruneError("the ModelProto refers to external data that is not loaded; "
                                  "pass the model's file path instead")
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
    from graphprune.frontends.external import resolve_external_data

    try:
        # every tensor at any depth, against the model's folder only (never the current directory)
        resolve_external_data(model, os.path.dirname(os.path.abspath(path)))
    except GraphpruneError as exc:
        raise GraphpruneError(f"cannot load external data of {path}: {exc}") from None
    except UnicodeDecodeError:
        raise GraphpruneError(f"not a valid ONNX file: a name or string field is not valid UTF-8 ({path})") from None
    return model, path


def outer_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies, at any depth) read from the enclosing scope.

    Iterative walk: nesting depth comes from the file. A name defined inside a body (its inputs,
    initializers, node outputs) shadows the outer one only within that body and its children.
    """
    reads: list[str] = []
    seen: set[str] = set()
    stack: list[tuple[onnx.GraphProto, frozenset[str]]] = []
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            stack.append((g, frozenset()))
    while stack:
        g, outer_local = stack.pop()
        local = set(outer_local)
        local.update(i.name for i in g.input)
        local.update(t.name for t in g.initializer)
        local.update(t.values.name for t in g.sparse_initializer)
        for n in g.node:
            local.update(o for o in n.output if o)
        frozen_local = frozenset(local)
        for n in g.node:
            for i in n.input:
                if i and i not in local and i not in seen:
                    seen.add(i)
                    reads.append(i)
            for attr in n.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    stack.append((sub, frozen_local))
        for o in g.output:
            if o.name and o.name not in local and o.name not in seen:
                seen.add(o.name)
                reads.append(o.name)
    return reads


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """Decode a tensor, turning unknown data types and size/dims mismatches into one clear line."""
    from graphprune.frontends.external import is_mapped, map_tensor

    try:
        if is_mapped(t):
            return map_tensor(t)
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
        for i in list(node.input) + outer_reads(node):
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
        needs = {i for i in list(node.input) + outer_reads(node) if i not in available}
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
            for i in list(node.input) + outer_reads(node):
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
        nodes.append(Node(name, n.op_type, list(n.input), list(n.output), attrs, n.domain, outer_reads(n)))
    return Graph(
        nodes=nodes,
        shapes=shapes,
        constants=constants,
        inputs=[i.name for i in g.input][:n_inputs] if n_inputs is not None else [i.name for i in g.input],
        outputs=[o.name for o in g.output],
        name=g.name or "graph",
    )


def _body_nodes(g: onnx.GraphProto) -> list[Node]:
    return [Node(n.name or f"{g.name}/{n.op_type}_{i}", n.op_type, list(n.input), list(n.output),
                 {a.name: _attr_value(a) for a in n.attribute if a.type != onnx.AttributeProto.GRAPH}, n.domain)
            for i, n in enumerate(g.node)]


def _infer_body(body: onnx.GraphProto, outer_shapes: dict[str, tuple[int, ...]],
                outer_consts: dict[str, np.ndarray], opsets: list) -> dict[str, tuple[int, ...]]:
    """Shapes inside a body, inferred on its own with the outer tensors it reads pinned to the
    shapes (and small values) known outside: the enclosing model's inference often leaves them open."""
    produced = {o for n in body.node for o in n.output} | {i.name for i in body.input} | {t.name for t in body.initializer}
    outer_refs = sorted({i for n in body.node for i in n.input if i and i not in produced})
    alone = onnx.GraphProto()
    alone.CopyFrom(body)
    for name in outer_refs:
        value = outer_consts.get(name)
        if value is not None and value.size <= 4096:
            alone.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        elif name in outer_shapes:
            dtype = onnx.TensorProto.FLOAT if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)
            alone.input.append(helper.make_tensor_value_info(name, dtype, list(outer_shapes[name])))
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        model = helper.make_model(alone, opset_imports=opsets)
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        graph = inferred.graph
    except Exception:  # noqa: BLE001 - best effort: unknown shapes make the enclosing op's cost unknown
        graph = body
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        sh = _shape_of(vi)
        if sh is not None:
            shapes[vi.name] = sh
    return shapes


def _inline_decided_if(body: onnx.GraphProto, shapes: dict[str, tuple[int, ...]],
                       consts: dict[str, np.ndarray]) -> bool:
    """Replace the first If whose condition follows from static shapes by the branch it takes."""
    ir = Graph(_body_nodes(body), shapes, consts, [], [])
    for k, n in enumerate(body.node):
        if n.op_type != "If" or n.domain not in ("", "ai.onnx"):
            continue
        cond = shape_value(ir, n.input[0])
        if cond is None or np.asarray(cond).size != 1:
            continue
        name = "then_branch" if bool(np.asarray(cond).ravel()[0]) else "else_branch"
        branch = next(a.g for a in n.attribute if a.name == name)
        taken = [copy.deepcopy(x) for x in branch.node]
        taken += [helper.make_node("Identity", [src.name], [dst], name=f"{n.name}/{name}/out{j}")
                  for j, (src, dst) in enumerate(zip(branch.output, n.output))]
        body.initializer.extend(branch.initializer)
        nodes = list(body.node)
        del body.node[:]
        body.node.extend(nodes[:k] + taken + nodes[k + 1:])
        return True
    return False


def _graph_ir(g: onnx.GraphProto, outer_shapes: dict[str, tuple[int, ...]],
              outer_consts: dict[str, np.ndarray], opsets: list) -> Graph:
    """Lower a subgraph body (If branch, Loop/Scan body) for the cost model.

    Ifs inside the body whose condition is decided by static shapes (an unbatched-input check,
    say) are replaced by the branch they take, so the shapes after them become known.
    """
    body = onnx.GraphProto()
    body.CopyFrom(g)
    # this copy is only costed: constants become initializers and constant arithmetic (computed
    # pads, say) is folded, so shape inference can see through it
    kept_nodes = []
    for n in body.node:
        v = _constant_value(n) if n.op_type == "Constant" and n.domain in ("", "ai.onnx") else None
        if v is not None:
            body.initializer.append(numpy_helper.from_array(v, n.output[0]))
        else:
            kept_nodes.append(n)
    del body.node[:]
    body.node.extend(kept_nodes)
    fold_graph_constants(body, opsets)
    for _ in range(16):
        consts = {t.name: tensor_to_array(t) for t in body.initializer}
        for n in body.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
                v = _constant_value(n)
                if v is not None:
                    consts[n.output[0]] = v
        shapes = _infer_body(body, outer_shapes, outer_consts, opsets)
        if not _inline_decided_if(body, {**outer_shapes, **shapes}, {**outer_consts, **consts}):
            break
    nodes = _body_nodes(body)
    known = {**outer_shapes, **shapes}
    for node, n in zip(nodes, body.node):
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                node.attrs[a.name] = _graph_ir(a.g, known, {**outer_consts, **consts}, opsets)
    return Graph(nodes=nodes, shapes=shapes, constants=consts, inputs=[i.name for i in body.input],
                 outputs=[o.name for o in body.output], name=body.name or "body")


def lower_subgraphs(graph: Graph, model: onnx.ModelProto) -> None:
    """Replace If/Loop/Scan graph attributes of the IR by lowered IR bodies (costed, not pruned)."""
    by_name = {n.name: n for n in graph.nodes}
    protos = list(model.graph.node)
    for i, node in enumerate(graph.nodes):
        proto = protos[i] if i < len(protos) else None
        if proto is None or not any(a.type == onnx.AttributeProto.GRAPH for a in proto.attribute):
            continue
        for a in proto.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                by_name[node.name].attrs[a.name] = _graph_ir(a.g, graph.shapes, graph.constants,
                                                             list(model.opset_import))


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
    listed = {i.name for i in g.input}  # IR 3 models list initializers as inputs already
    for name, t in moved.items():
        if name not in listed:
            g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    if model.ir_version < 4:
        list_initializers_as_inputs(light)
    return light, {name: t for name, t in moved.items()}


def list_initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """IR < 4 requires every initializer to also be a graph input; normalisation keeps them apart,
    so checked and written IR 3 models get them re-listed (after the real inputs, current dims)."""
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.name not in listed:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


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
        sess = ort_session(probe, opts)
        rng = np.random.default_rng(0)
        enums = compared_constants(model)
        feed = {}
        for inp in probe.graph.input:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            if np.issubdtype(dtype, np.floating):
                feed[inp.name] = rng.standard_normal(dims).astype(dtype)
            else:
                feed[inp.name] = np.full(dims, (enums.get(inp.name) or [0])[0]).astype(dtype)
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
    fold_constant_nodes(model)
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
    lower_subgraphs(graph, analysed)
    fold_dequantized_weights(graph)
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
