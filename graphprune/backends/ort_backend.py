"""Latency measurement with onnxruntime: the reference every other backend is compared against."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from graphprune.backends.latency import LatencyStats
from graphprune.errors import GraphpruneError
from graphprune.frontends.external import ort_session

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def _as_proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.exists():
        raise GraphpruneError(f"model file not found: {path}")
    from graphprune.frontends.onnx_frontend import read_model

    return read_model(path)[0]  # external data only from the model's folder, under the loader rules


def random_inputs(model: onnx.ModelProto | str | Path, seed: int = 0,
                  input_shape: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """Random feeds for every real graph input (initializers excluded).

    Dynamic dims come from input_shape (as the CLI parses --input-shape; pinned under the same
    rules as for pruning), else become 1.
    """
    proto = _as_proto(model)
    if input_shape:
        from graphprune.frontends.onnx_frontend import pin_input_shapes

        init_names = {i.name for i in proto.graph.initializer}
        real = [i for i in proto.graph.input if i.name not in init_names]
        light = onnx.ModelProto()
        light.graph.input.extend(real)
        proto = pin_input_shapes(light, input_shape)
    init_names = {i.name for i in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in proto.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = _NP_TYPES.get(tt.elem_type)
        if dtype is None:
            raise GraphpruneError(f"input {inp.name!r} has an unsupported element type {tt.elem_type}")
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def make_session(model: onnx.ModelProto | str | Path, intra_op_threads: int = 1):
    """An onnxruntime CPU session; one intra-op thread by default so numbers are stable and comparable."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    proto = _as_proto(model)
    try:
        return ort_session(proto, opts)
    except Exception as exc:  # onnxruntime raises several unrelated types
        raise GraphpruneError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from exc


def run_ort(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reference outputs, used to check compiled backends."""
    return make_session(model, intra_op_threads=0).run(None, feeds)


def measure_ort(
    model: onnx.ModelProto | str | Path,
    runs: int = 50,
    warmup: int = 5,
    intra_op_threads: int = 1,
    feeds: dict[str, np.ndarray] | None = None,
) -> LatencyStats:
    """Time `runs` single inferences after `warmup` untimed ones."""
    if runs < 1:
        raise GraphpruneError("--runs must be at least 1")
    feeds = feeds if feeds is not None else random_inputs(model)
    return LatencyStats.from_samples(sample_ort(model, feeds, runs, warmup, intra_op_threads))


def sample_ort(model: onnx.ModelProto | str | Path | bytes, feeds: dict[str, np.ndarray], runs: int,
               warmup: int = 3, intra_op_threads: int = 1) -> list[float]:
    """Raw per-run milliseconds; callers interleave rounds of several models to share machine noise."""
    sess = make_session(onnx.load_from_string(model) if isinstance(model, bytes) else model, intra_op_threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples
