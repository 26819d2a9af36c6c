"""Latency measurement with onnxruntime: the reference every other backend is compared against."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

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


def make_session(model: onnx.ModelProto | str | Path, intra_op_threads: int = 1, spin: bool = True):
    """An onnxruntime CPU session; one intra-op thread by default so numbers are stable and comparable.

    spin=False stops idle worker threads from busy-waiting, so sessions timed in turn do not steal
    cores from each other.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


CLOCKS = ("wall", "cpu", "auto")


def clock_for(clock: str, intra_op_threads: int) -> str:
    """Resolve "auto": the calling thread's CPU time for one-thread sessions, wall time otherwise.

    Why: with one intra-op thread onnxruntime runs every op on the calling thread, so that thread's
    CPU time is the model's compute time without the time the scheduler gave to other processes. On a
    busy machine (more runnable processes than cores) wall-clock medians of the same pair of models
    ranged from 0.27 to 0.73 while thread CPU time gave 0.502-0.509. With a thread pool the work runs
    on other threads, so only wall time is meaningful there.
    """
    if clock not in CLOCKS:
        raise GraphpruneError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "auto":
        return "cpu" if intra_op_threads == 1 else "wall"
    if clock == "cpu" and intra_op_threads != 1:
        raise GraphpruneError("the cpu clock times the calling thread: it needs intra_op_threads=1")
    return clock


def _timer(clock: str) -> Callable[[], float]:
    return time.thread_time if clock == "cpu" else time.perf_counter


def sample_ort(model: onnx.ModelProto | str | Path | bytes, feeds: dict[str, np.ndarray], runs: int,
               warmup: int = 3, intra_op_threads: int = 1, clock: str = "wall") -> list[float]:
    """Raw per-run milliseconds; callers interleave rounds of several models to share machine noise."""
    now = _timer(clock_for(clock, intra_op_threads))
    sess = make_session(onnx.load_from_string(model) if isinstance(model, bytes) else model, intra_op_threads)
    for _ in range(warmup):
        sess.run(None, feeds)
    samples = []
    for _ in range(runs):
        t0 = now()
        sess.run(None, feeds)
        samples.append((now() - t0) * 1e3)
    return samples


def interleaved_samples(
    models: list[onnx.ModelProto | str | Path],
    feeds: list[dict[str, np.ndarray]] | dict[str, np.ndarray],
    rounds: int = 20,
    warmup: int = 3,
    intra_op_threads: int = 1,
    budget_s: float | None = None,
    min_rounds: int = 5,
    on_round: Callable[[int, int], None] | None = None,
    clock: str = "wall",
) -> list[list[float]]:
    """Per-model milliseconds from interleaved rounds: each round runs every model once, in turn.

    Why interleave: machine noise (another process, frequency changes) then hits all models alike,
    so the ratio of medians stays meaningful on a busy machine where back-to-back timing does not.
    `budget_s` bounds the timed part (at least `min_rounds` rounds still run); `clock` is clock_for's.
    """
    if rounds < 1:
        raise GraphpruneError("--runs must be at least 1")
    feed_list = feeds if isinstance(feeds, list) else [feeds] * len(models)
    sessions = [make_session(m, intra_op_threads, spin=intra_op_threads == 1 or len(models) == 1) for m in models]
    for _ in range(warmup):
        for sess, feed in zip(sessions, feed_list):
            sess.run(None, feed)
    now = _timer(clock_for(clock, intra_op_threads))
    samples: list[list[float]] = [[] for _ in models]
    start = time.perf_counter()
    for r in range(rounds):
        for i, (sess, feed) in enumerate(zip(sessions, feed_list)):
            t0 = now()
            sess.run(None, feed)
            samples[i].append((now() - t0) * 1e3)
        if on_round:
            on_round(r + 1, rounds)
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return samples


def measure_speedup(original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict[str, np.ndarray],
                    budget_s: float = 3.0, max_rounds: int = 50, intra_op_threads: int = 1,
                    progress: Callable[[str], None] | None = None, clock: str = "auto") -> dict:
    """Original vs pruned latency on onnxruntime CPU, interleaved and bounded by `budget_s`.

    This is the measurement every `prune` run reports next to its FLOPs ratio: short (a few seconds),
    so it is a sanity check against "pruned but not faster", not a benchmark. With one thread it
    times the thread's CPU time by default (clock_for), so a busy machine does not decide the plan.
    """
    clock = clock_for(clock, intra_op_threads)
    def tick(done: int, total: int) -> None:
        if progress:
            progress(f"measuring speed-up on onnxruntime (round {done})")

    a, b = interleaved_samples([original, pruned], feed, rounds=max_rounds, warmup=2,
                               intra_op_threads=intra_op_threads, budget_s=budget_s, on_round=tick, clock=clock)
    before, after = LatencyStats.from_samples(a), LatencyStats.from_samples(b)
    return {"backend": "onnxruntime CPU", "threads": intra_op_threads, "rounds": len(a),
            "clock": "thread CPU time" if clock == "cpu" else "wall",
            "before_ms": before.median_ms, "after_ms": after.median_ms,
            "ratio": after.median_ms / before.median_ms if before.median_ms else 1.0,
            "speedup": before.median_ms / after.median_ms if after.median_ms else float("inf"),
            "spread_pct": [round(before.spread_pct, 2), round(after.spread_pct, 2)]}
