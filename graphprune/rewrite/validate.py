"""Validate a rewritten model before anything is written: checker, shape inference, onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, shape_inference

from graphprune.errors import GraphpruneError
from graphprune.frontends.external import has_mapped
from graphprune.frontends.onnx_frontend import compared_constants
from graphprune.ir.graph import Graph


def random_feed(proto: onnx.ModelProto, graph: Graph, seed: int = 0,
                values: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Inputs shaped as analysed (dynamic batch pinned to 1), deterministic for a seed.

    `values` fixes an input to a value (--input-value); a single-element integer input the model
    compares with constants (an enum such as a sample rate) gets the first such constant.
    """
    _check_run_size(graph)
    rng = np.random.default_rng(seed)
    feed = {}
    names = {i.name for i in proto.graph.input}
    for name in values or {}:
        if name not in names:
            raise GraphpruneError(f"--input-value names '{name}', which is not a model input ({', '.join(sorted(names))})")
    enums = compared_constants(proto)
    for inp in proto.graph.input:
        shape = graph.shape(inp.name)
        if shape is None:
            raise GraphpruneError(f"cannot build a test input for '{inp.name}': unknown shape")
        np_type = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if values and inp.name in values:
            feed[inp.name] = np.full(shape, values[inp.name]).astype(np_type)
        elif int(np.prod(shape)) == 1 and not np.issubdtype(np_type, np.floating) and enums.get(inp.name):
            feed[inp.name] = np.full(shape, enums[inp.name][0]).astype(np_type)
        elif np.issubdtype(np_type, np.floating):
            feed[inp.name] = rng.standard_normal(shape).astype(np_type)
        else:
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(np_type)
    return feed


# one validation run must fit the machine: no tensor of the analysed shapes above this many elements
MAX_TENSOR_ELEMENTS = 1 << 28


def _check_run_size(graph: Graph) -> None:
    """Refuse in one line before allocating, instead of a MemoryError deep inside numpy or ORT."""
    from math import prod

    for name, shape in graph.shapes.items():
        n = prod(shape)
        if n > MAX_TENSOR_ELEMENTS:
            raise GraphpruneError(
                f"too large to validate: tensor '{name}' has shape {list(shape)} ({n:,} elements, limit "
                f"{MAX_TENSOR_ELEMENTS:,}); pass a smaller --input-shape")


def run_onnx(proto: onnx.ModelProto, feed: dict[str, np.ndarray], threads: int = 0,
             optimize: bool = True) -> list[np.ndarray]:
    """Outputs of one onnxruntime CPU run; optimize=False runs every op as written (no fusions or
    layout transforms, which can run a kernel on data whose shape the plain kernel would refuse)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # failures surface as one GraphpruneError line, not ORT's log
    if threads:
        opts.intra_op_num_threads = threads
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    from graphprune.frontends.external import ort_session

    return ort_session(proto, opts).run(None, feed)


def _scoped_shapes(graph: onnx.GraphProto, outer: dict[str, tuple[int | None, ...]]) -> dict[str, tuple[int | None, ...]]:
    shapes = dict(outer)
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    return shapes


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def channel_mismatches(model: onnx.ModelProto) -> list[str]:
    """Weighted ops (at any subgraph depth) whose weight disagrees with the channels they receive.

    Checked directly on shapes, because neither strict shape inference (it does not compare Conv
    channels) nor an optimised onnxruntime run (a layout transform can run a Conv on the wrong
    width when it is a multiple of 4) catches every case. `model` should be shape-inferred.
    """
    problems: list[str] = []
    stack = [(model.graph, {})]
    while stack:
        graph, outer = stack.pop()
        shapes = _scoped_shapes(graph, outer)
        for n in graph.node:
            def shape(k: int) -> tuple[int | None, ...] | None:
                return shapes.get(n.input[k]) if k < len(n.input) and n.input[k] else None

            x, w = shape(0), shape(1)
            what = f"{n.op_type} '{n.name or n.output[0]}'"
            if n.op_type in ("Conv", "ConvTranspose") and x and w and len(x) >= 2 and len(w) >= 2:
                group = _attr_int(n, "group", 1)
                want = w[1] * group if n.op_type == "Conv" else w[0]
                if x[1] is not None and w[1] is not None and w[0] is not None and x[1] != want:
                    problems.append(f"{what} expects {want} input channels, receives {x[1]}")
            elif n.op_type == "Gemm" and x and w and len(x) == 2 and len(w) == 2:
                k_a = x[0] if _attr_int(n, "transA", 0) else x[1]
                k_b = w[1] if _attr_int(n, "transB", 0) else w[0]
                if None not in (k_a, k_b) and k_a != k_b:
                    problems.append(f"{what} multiplies {k_a} features by a weight for {k_b}")
            elif n.op_type == "MatMul" and x and w and len(x) >= 1 and len(w) >= 2:
                if None not in (x[-1], w[-2]) and x[-1] != w[-2]:
                    problems.append(f"{what} multiplies {x[-1]} features by a weight for {w[-2]}")
            elif n.op_type in ("BatchNormalization", "InstanceNormalization") and x and w and len(x) >= 2:
                if None not in (x[1], w[0]) and x[1] != w[0]:
                    problems.append(f"{what} normalises {x[1]} channels with {w[0]} scales")
            for a in n.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    stack.append((sub, shapes))
    return problems


def compare_to_masked(reference: list[np.ndarray], got: list[np.ndarray]) -> str | None:
    """None if the pruned outputs equal the consumer-masked original's, else what differs.

    Positions where the reference itself is not finite (NaN weights in the input) are skipped.
    """
    for k, (r, g) in enumerate(zip(reference, got)):
        r = np.asarray(r, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            return f"output #{k} has shape {g.shape}, the masked original {r.shape}"
        ok = np.isfinite(r)
        if not ok.any():
            continue
        diff = float(np.max(np.abs(np.where(ok, r - g, 0.0)), initial=0.0))
        scale = float(np.max(np.abs(r[ok]), initial=0.0))
        if not diff <= 1e-4 + 1e-3 * scale:
            return f"output #{k} differs from the masked original by {diff:.3g} (scale {scale:.3g})"
    return None


def custom_domains(model: onnx.ModelProto) -> list[str]:
    """Op domains onnxruntime cannot run without the user's custom-op library."""
    standard = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
    return sorted({n.domain for n in model.graph.node if n.domain not in standard})


def validate(model: onnx.ModelProto, feed: dict[str, np.ndarray], expected_shapes: list[tuple[int, ...]],
             run: bool = True, reference: list[np.ndarray] | None = None) -> onnx.ModelProto:
    """Return the shape-inferred skeleton, or raise GraphpruneError saying which check failed.

    run=False skips the onnxruntime stage (models with custom-op domains); the output shapes are
    then checked against strict shape inference instead. `reference`: outputs of the consumer-masked
    original on the same feed (see masked_reference); the pruned outputs must equal them.

    Checker and shape inference run on a weightless skeleton (weights become typed inputs), which
    checks the same structure without serialising every weight twice.
    """
    from graphprune.frontends.onnx_frontend import skeleton

    light, _ = skeleton(model)
    try:
        onnx.checker.check_model(light)
    except Exception as exc:
        raise GraphpruneError(f"pruned model failed the ONNX checker: {str(exc).splitlines()[0][:200]}") from None
    try:
        inferred = shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise GraphpruneError(f"pruned model failed shape inference: {str(exc).splitlines()[0][:200]}") from None
    problems = channel_mismatches(inferred)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GraphpruneError(f"pruned model is inconsistent: {problems[0]}{more}")
    if run:
        try:
            outputs = run_onnx(model, feed)
            # again with every graph optimisation off: each op runs as written, on the shapes it gets
            plain = run_onnx(model, feed, optimize=False)
        except Exception as exc:
            raise GraphpruneError(f"pruned model failed to run in onnxruntime: {str(exc).splitlines()[0][:200]}") from None
        got = [tuple(o.shape) for o in outputs]
        if got != [tuple(o.shape) for o in plain]:
            raise GraphpruneError("pruned model gives different output shapes with onnxruntime's optimisations off")
        if reference is not None:
            # a big (memory-mapped) model's reference ran unoptimised (see masked_reference)
            problem = compare_to_masked(reference, plain if has_mapped(model) else outputs)
            if problem:
                raise GraphpruneError("pruned model is not equivalent to the original with the removed channels "
                                      f"masked: {problem}")
    else:
        from graphprune.frontends.onnx_frontend import _shape_of

        declared = {vi.name: _shape_of(vi) for vi in list(inferred.graph.output) + list(inferred.graph.value_info)}
        got = [declared.get(o.name) for o in model.graph.output]
        if any(g is None for g in got):
            return inferred  # dynamic output dims: nothing static to compare
        batch = [tuple(s)[0] for s in expected_shapes]
        got = [(b,) + tuple(g[1:]) for b, g in zip(batch, got)]
    if got != [tuple(s) for s in expected_shapes]:
        raise GraphpruneError(f"pruned model output shapes {got} differ from the original {expected_shapes}")
    return inferred


def masked_reference(original: onnx.ModelProto, analysis, removed,
                     feed: dict[str, np.ndarray]) -> list[np.ndarray] | None:
    """Outputs of the original with the removed channels' consumers zeroed: the correctness oracle
    as a validation stage (it catches an analysis that missed a consumer - the slim model would
    still run, with different numbers). None when nothing is removed or the original cannot run
    (then the plain validation reports the problem)."""
    from graphprune.frontends.external import SpillFile
    from graphprune.rewrite.masking import mask_consumers_onnx

    if not removed:
        return None
    # a big model's masked weights go to a spill file, and the run is unoptimised: onnxruntime then
    # memory-maps them instead of copying every weight into a re-laid-out form
    spill = SpillFile() if has_mapped(original) else None
    try:
        return run_onnx(mask_consumers_onnx(original, analysis, removed, spill=spill), feed, optimize=spill is None)
    except Exception as exc:
        masks = analysis.keep_masks(removed)
        if any(not masks[x].all() for x in analysis.ctx.norm_stats_nodes.values()):
            # the reference form of a pruned LayerNorm is ours: its failure must not skip the check
            raise GraphpruneError("internal error: the masked reference (LayerNorm statistics over the kept "
                                  f"channels) failed to run: {str(exc).splitlines()[0][:200]}") from None
        return None
    finally:
        if spill is not None:
            spill.remove()
