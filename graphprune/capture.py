"""Streaming capture of intermediate ONNX tensors through onnxruntime.

Data-driven passes (DI, calibration, recovery) need the values of a few named tensors on
calibration data. Materialising them for the whole data set is what made DI need 4-17 GB, so
this module yields them one batch at a time: the caller folds each batch into running statistics
and drops it. Static batch dimensions are honoured (a model exported with batch 1 is fed one
sample per run; a fixed batch B is fed B at a time, the last chunk padded and trimmed), and the
batch size of dynamic models is chosen from the captured tensors' per-sample size so that one
batch of outputs stays within a memory budget.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from graphprune.errors import GraphpruneError

Feed = dict[str, np.ndarray]


def _proto(model: Any) -> Any:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's model
    from graphprune.frontends.onnx_frontend import load_onnx

    return onnx.ModelProto.FromString(load_onnx(model).proto.SerializeToString())


def _dims(value_info: Any) -> list[int | None]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def graph_inputs(proto: Any) -> list[Any]:
    """The real inputs of a graph (initializers listed as inputs are not fed)."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def normalize_feed(proto: Any, inputs: np.ndarray | Feed) -> tuple[Feed, int]:
    """Map calibration arrays onto the graph inputs and check them; returns (feed, samples).

    Bad data is a one-line GraphpruneError naming the input, what it expects and what it got.
    """
    ins = graph_inputs(proto)
    if not isinstance(inputs, dict):
        if len(ins) != 1:
            raise GraphpruneError(f"the model has {len(ins)} inputs ({', '.join(i.name for i in ins)}): "
                                  "give calibration data as a dict of arrays by input name")
        inputs = {ins[0].name: inputs}
    by_name = {i.name: i for i in ins}
    unknown = sorted(set(inputs) - set(by_name))
    missing = sorted(set(by_name) - set(inputs))
    if unknown or missing:
        raise GraphpruneError(f"calibration data does not match the model inputs: missing {missing}, unknown {unknown}")
    feed: Feed = {}
    n = None
    for name, arr in inputs.items():
        arr = np.asarray(arr)
        want = _dims(by_name[name])
        if arr.ndim != len(want) or arr.ndim == 0:
            raise GraphpruneError(f"calibration input '{name}' has shape {tuple(arr.shape)}; the model expects "
                                  f"rank {len(want)} {tuple(d if d is not None else '?' for d in want)} (samples first)")
        bad = [i for i in range(1, arr.ndim) if want[i] is not None and want[i] != arr.shape[i]]
        if bad:
            raise GraphpruneError(f"calibration input '{name}' has shape {tuple(arr.shape)}; the model expects "
                                  f"{tuple(d if d is not None else '?' for d in want)} (samples first)")
        if n is not None and len(arr) != n:
            raise GraphpruneError(f"calibration inputs have different sample counts ({n} and {len(arr)})")
        n = len(arr)
        elem = by_name[name].type.tensor_type.elem_type
        from onnx import helper

        feed[name] = arr.astype(helper.tensor_dtype_to_np_dtype(elem), copy=False)
    if not n:
        raise GraphpruneError("calibration data is empty")
    return feed, n


def static_batch(proto: Any) -> int | None:
    """The fixed batch size of the model's inputs, or None when the batch dimension is dynamic."""
    sizes = {(_dims(i) or [None])[0] for i in graph_inputs(proto)}
    sizes.discard(None)
    return sizes.pop() if len(sizes) == 1 else None


def iter_tensors(model: Any, names: list[str], inputs: np.ndarray | Feed, batch_size: int | None = None,
                 bytes_per_sample: float | None = None, budget_bytes: float = 256e6,
                 ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (samples in this batch, {name: value}) for the named tensors over the calibration data.

    `model` is a path or ModelProto; `names` are any tensors of the graph (they become graph
    outputs of a private copy). Without `batch_size`, dynamic models run
    budget_bytes / bytes_per_sample samples at a time (8 when the size is unknown).
    """
    import onnx
    import onnxruntime as ort

    proto = _proto(model)
    feed_all, n = normalize_feed(proto, inputs)
    have = {o.name for o in proto.graph.output}
    for t in names:
        if t not in have:
            proto.graph.output.append(onnx.ValueInfoProto(name=t))  # type left to onnxruntime
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # graph outputs are kept
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise GraphpruneError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:200]}") from None
    fixed = static_batch(proto)
    if fixed is not None:
        step = fixed
    elif batch_size is not None:
        step = max(1, int(batch_size))
    elif bytes_per_sample:
        step = int(max(1, min(256, budget_bytes // bytes_per_sample)))
    else:
        step = 8
    for i in range(0, n, step):
        feed = {k: v[i: i + step] for k, v in feed_all.items()}
        real = len(next(iter(feed.values())))
        if fixed is not None and real < fixed:  # pad the last chunk of a fixed-batch model, trim after
            feed = {k: np.concatenate([v, np.repeat(v[-1:], fixed - real, axis=0)]) for k, v in feed.items()}
        try:
            outs = sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as exc:  # noqa: BLE001
            raise GraphpruneError(f"calibration data does not run through the model: "
                                  f"{str(exc).splitlines()[0][:200]}") from None
        got = {}
        for t, o in zip(names, outs):
            o = np.asarray(o)
            if fixed is not None and real < fixed and o.ndim and o.shape[0] == fixed:
                o = o[:real]
            got[t] = o
        yield real, got
