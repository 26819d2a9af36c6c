"""Activation capture: run calibration batches through a model and hand chosen tensors to a visitor.

ONNX: the wanted tensors become extra graph outputs of a private copy, run by onnxruntime in batches
the model accepts (one sample at a time when its batch axis is fixed; a dynamic batch axis that the
graph cannot really vary, e.g. a Reshape with a hard-coded 1, falls back to one sample too).
PyTorch: forward pre-hooks on the modules that consume the tensors. Either way activations are
streamed to the visitor batch by batch and never accumulated here, so memory does not grow with N.

Two entry points share this module: `capture_onnx`/`capture_module` stream consumer inputs to a
visitor (calibration recovery); `iter_tensors` yields named ONNX tensors batch by batch with a
memory-bounded batch size (DI's feature statistics).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from graphprune.calib import Batch, Calibration
from graphprune.errors import GraphpruneError
from graphprune.frontends.external import ort_session

Visitor = Callable[[dict[str, np.ndarray]], None]


def _progress(total: int, desc: str, enabled: bool | None = None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", leave=False)


def with_outputs(proto: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `proto` whose graph also outputs `names` (intermediate tensors)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    have = {o.name for o in model.graph.output}
    for t in names:
        if t not in have:
            model.graph.output.append(helper.make_empty_tensor_value_info(t))
            have.add(t)
    return model


class OnnxRunner:
    """One onnxruntime session over `proto` returning `outputs`, fed in batches the model accepts."""

    def __init__(self, proto: onnx.ModelProto, outputs: list[str], max_batch: int = 16, optimize: bool = True) -> None:
        import onnxruntime as ort

        self.outputs = list(outputs)
        model = with_outputs(proto, self.outputs)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # no busy-waiting worker threads: they only burn cycles on a shared machine between small runs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # basic optimisations (constant folding, redundant-node removal) keep every named output;
        # the layout/fusion levels would not change the numbers but cost start-up time
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        try:
            self.sess = ort_session(model, opts)
        except Exception as exc:
            raise GraphpruneError(f"onnxruntime cannot load the model for calibration: {str(exc).splitlines()[0][:200]}") from None
        self.input_types = {}
        fixed = None
        for inp in self.sess.get_inputs():
            self.input_types[inp.name] = _ort_dtype(inp.type)
            dim0 = inp.shape[0] if inp.shape else None
            if isinstance(dim0, int) and dim0 > 0:
                fixed = dim0 if fixed is None else min(fixed, dim0)
        self.fixed_batch = fixed
        self.batch = fixed if fixed is not None else max_batch

    def _run(self, feed: Batch) -> list[np.ndarray]:
        feed = {k: np.ascontiguousarray(v, dtype=self.input_types.get(k, v.dtype)) for k, v in feed.items()}
        return self.sess.run(self.outputs, feed)

    def run(self, feed: Batch) -> list[np.ndarray]:
        """Outputs for a batch of any size: split into runs the model accepts, results concatenated."""
        n = len(next(iter(feed.values())))
        parts: list[list[np.ndarray]] = []
        i = 0
        while i < n:
            size = min(self.batch, n - i)
            if self.fixed_batch is not None and size != self.fixed_batch:
                raise GraphpruneError(f"the model only accepts batches of {self.fixed_batch}")
            chunk = {k: v[i:i + size] for k, v in feed.items()}
            try:
                parts.append(self._run(chunk))
            except Exception as exc:
                if size > 1:  # a "dynamic" batch axis the graph cannot really vary: go one by one
                    self.batch = 1
                    continue
                raise GraphpruneError(
                    f"onnxruntime failed on the calibration data: {str(exc).splitlines()[0][:200]}") from None
            i += size
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate([p[j] for p in parts]) for j in range(len(self.outputs))]


def _ort_dtype(type_str: str) -> Any:
    table = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
    return table.get(type_str, np.float32)


def capture_onnx(proto: onnx.ModelProto, tensors: list[str], calib: Calibration, visit: Visitor,
                 *, max_batch: int = 16, progress: bool | None = None, desc: str = "capturing activations") -> None:
    """Stream the values of `tensors` on every calibration batch to `visit({tensor: array})`."""
    runner = OnnxRunner(proto, tensors, max_batch=max_batch)
    bar = _progress(calib.n, desc, progress)
    step = runner.batch if runner.fixed_batch is not None else max(runner.batch, 1)
    for batch in calib.batches(step):
        values = runner.run(batch)
        visit(dict(zip(tensors, values)))
        if bar is not None:
            bar.update(len(next(iter(batch.values()))))
    if bar is not None:
        bar.close()


def module_inputs(model: Any, modules: dict[str, str], inputs: tuple) -> dict[str, np.ndarray]:
    """One eval-mode, no-grad forward: the first input of each named submodule ({key: module path}).

    Each module's train/eval flag is restored afterwards.
    """
    import torch

    subs = dict(model.named_modules())
    store: dict[str, np.ndarray] = {}
    hooks = []
    for key, path in modules.items():
        if path not in subs:
            raise GraphpruneError(f"internal error: no submodule {path!r} to capture")

        def hook(_m: Any, args: tuple, key: str = key) -> None:
            store[key] = args[0].detach().float().cpu().numpy()
        hooks.append(subs[path].register_forward_pre_hook(hook))
    from graphprune.frontends.fx_frontend import eval_mode

    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return store


def capture_module(model: Any, modules: dict[str, str], calib: Calibration, visit: Visitor,
                   *, batch_size: int = 32, progress: bool | None = None,
                   desc: str = "capturing activations") -> None:
    """Stream the first input of each named submodule ({key: module path}) to `visit({key: array})`."""
    import torch

    bar = _progress(calib.n, desc, progress)
    for batch in calib.batches(batch_size):
        visit(module_inputs(model, modules, tuple(torch.as_tensor(batch[k]) for k in calib.names)))
        if bar is not None:
            bar.update(len(next(iter(batch.values()))))
    if bar is not None:
        bar.close()


# --- named-tensor streaming for DI (iter_tensors) ---
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
        sess = ort_session(proto, opts)
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
