"""An ONNX graph as a trainable torch module, and its weights written back into the same graph.

Why an interpreter of our own instead of a converter (docs/architecture.md): the maintained
converter (onnx2torch 1.5.15) stops on PP-OCRv4 rec, our main benchmark model (BatchNormalization
of unknown rank, weights in Constant nodes), and the way back through torch.onnx.export would
re-trace the model into a different graph with new tensor names, a new opset and no metadata.
Here the module executes the graph node by node with torch ops, float initializers become
nn.Parameters keyed by their ONNX name, and `export_onnx` copies the trained values into those
initializers: the written model is the slim model's own graph (names, opset, metadata, node
order) with new numbers, which is what a deployment pipeline expects back.

Op semantics follow the ONNX spec per opset (attributes that became inputs: Clip 11, Squeeze/
Unsqueeze/ReduceSum/Split 13, other Reduce* 18; Softmax's 2-D coercion before 13). An op outside
the table is a one-line GraphpruneError naming it, raised when the module is built.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from graphprune.errors import GraphpruneError

Env = dict[str, Any]
OpFn = Callable[["_Ctx", onnx.NodeProto, list[Any]], Any]

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}
# BatchNormalization inputs 3 and 4 (running mean/var) are statistics, not trained weights
_STAT_SLOTS = {"BatchNormalization": (3, 4)}


class _Ctx:
    """Per-node view: attributes with defaults and the model's opset."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.attrs: dict[str, Any] = {}

    def a(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)]


def _scalar(t: Any) -> float:
    return float(t.reshape(-1)[0]) if hasattr(t, "reshape") else float(t)


def _pads(ctx: _Ctx, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Apply ONNX padding (explicit begin/end or auto_pad); returns the padded input and symmetric pads."""
    nd = len(kernel)
    auto = ctx.a("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    else:
        pads = list(ctx.a("pads", [0] * (2 * nd)))
    begin, end = pads[:nd], pads[nd:]
    if begin == end:
        return x, begin
    spec: list[int] = []
    for i in reversed(range(nd)):
        spec += [begin[i], end[i]]
    return F.pad(x, spec), [0] * nd


def _conv(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    strides = list(ctx.a("strides", [1] * nd))
    dil = list(ctx.a("dilations", [1] * nd))
    x, pad = _pads(ctx, x, list(w.shape[2:]), strides, dil)
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, strides, pad, dil, int(ctx.a("group", 1)))


def _conv_transpose(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    if ctx.a("output_shape") is not None or ctx.a("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise GraphpruneError("ConvTranspose with output_shape/auto_pad is not supported by the trainable module")
    pads = list(ctx.a("pads", [0] * (2 * nd)))
    if pads[:nd] != pads[nd:]:
        raise GraphpruneError("ConvTranspose with asymmetric pads is not supported by the trainable module")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(x, w, b, list(ctx.a("strides", [1] * nd)), pads[:nd], list(ctx.a("output_padding", [0] * nd)),
              int(ctx.a("group", 1)), list(ctx.a("dilations", [1] * nd)))


def _pool(kind: str) -> OpFn:
    def run(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
        x = ins[0]
        k = list(ctx.a("kernel_shape"))
        nd = len(k)
        strides = list(ctx.a("strides", [1] * nd))
        dil = list(ctx.a("dilations", [1] * nd))
        ceil = bool(ctx.a("ceil_mode", 0))
        if kind == "max":
            padded, pad = (x, [0] * nd)
            if ctx.a("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or list(ctx.a("pads", [0] * 2 * nd))[:nd] != list(ctx.a("pads", [0] * 2 * nd))[nd:]:
                padded, pad = _pads(ctx, x, k, strides, dil)
                if padded is not x:  # explicit asymmetric padding: pad with -inf
                    spec: list[int] = []
                    pads = list(ctx.a("pads"))
                    for i in reversed(range(nd)):
                        spec += [pads[i], pads[i + nd]]
                    padded, pad = F.pad(x, spec, value=float("-inf")), [0] * nd
            else:
                pad = list(ctx.a("pads", [0] * 2 * nd))[:nd]
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return fn(padded, k, strides, pad, dil, ceil)
        padded, pad = _pads(ctx, x, k, strides, dil)
        include = bool(ctx.a("count_include_pad", 0))
        if padded is not x and not include:
            raise GraphpruneError("AveragePool with asymmetric pads and count_include_pad=0 is not supported")
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        if nd == 1:
            return fn(padded, k, strides, pad, ceil, include)
        return fn(padded, k, strides, pad, ceil, include)
    return run


def _axes(ctx: _Ctx, ins: list[Any], since: int) -> list[int] | None:
    """Axes of Squeeze/Unsqueeze/Reduce*: an attribute before opset `since`, an input after."""
    if ctx.opset >= since:
        return _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
    v = ctx.a("axes")
    return list(v) if v is not None else None


def _reduce(fn: Callable[..., torch.Tensor], since: int) -> OpFn:
    def run(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
        x = ins[0]
        axes = _axes(ctx, ins, since)
        keep = bool(ctx.a("keepdims", 1))
        if not axes:
            if ctx.a("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=[a % x.dim() for a in axes], keepdim=keep)
    return run


def _softmax(log: bool) -> OpFn:
    def run(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
        x = ins[0]
        fn = F.log_softmax if log else F.softmax
        if ctx.opset >= 13:
            return fn(x, dim=int(ctx.a("axis", -1)))
        axis = int(ctx.a("axis", 1)) % x.dim()
        if axis == x.dim() - 1:
            return fn(x, dim=-1)
        shape = x.shape
        return fn(x.reshape(int(np.prod(shape[:axis])), -1), dim=1).reshape(shape)
    return run


def _clip(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    if ctx.opset < 11:
        lo, hi = ctx.a("min"), ctx.a("max")
    else:
        lo = _scalar(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        hi = _scalar(ins[2]) if len(ins) > 2 and ins[2] is not None else None
    return torch.clamp(ins[0], lo, hi)


def _gemm(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    a, b = ins[0], ins[1]
    if ctx.a("transA", 0):
        a = a.t()
    if ctx.a("transB", 0):
        b = b.t()
    y = float(ctx.a("alpha", 1.0)) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + float(ctx.a("beta", 1.0)) * ins[2]
    return y


def _reshape(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, shape = ins[0], _ints(ins[1])
    if not ctx.a("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x = ins[0]
    if ctx.opset < 10:
        starts, ends = list(ctx.a("starts")), list(ctx.a("ends"))
        axes = list(ctx.a("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise GraphpruneError("Slice with a non-positive step is not supported by the trainable module")
        index[ax % x.dim()] = slice(s, e, st)
    return x[tuple(index)]


def _squeeze(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x = ins[0]
    axes = _axes(ctx, ins, 13)
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _unsqueeze(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x = ins[0]
    axes = _axes(ctx, ins, 13) or []
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _gather(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, idx = ins[0], ins[1].long()
    axis = int(ctx.a("axis", 0)) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _split(ctx: _Ctx, n: onnx.NodeProto, ins: list[Any]) -> tuple[torch.Tensor, ...]:
    x = ins[0]
    axis = int(ctx.a("axis", 0))
    sizes = (_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None) if ctx.opset >= 13 else ctx.a("split")
    if not sizes:
        parts = len(n.output)
        sizes = [-(-x.shape[axis] // parts)] * parts
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, list(sizes), dim=axis))


def _pad(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x = ins[0]
    mode = ctx.a("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if ctx.opset < 11:
        pads, value = list(ctx.a("pads")), float(ctx.a("value", 0.0))
    else:
        pads = _ints(ins[1])
        value = _scalar(ins[2]) if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        if len(ins) > 3 and ins[3] is not None:
            raise GraphpruneError("Pad with an axes input is not supported by the trainable module")
    nd = x.dim()
    spec: list[int] = []
    for i in reversed(range(nd)):
        spec += [pads[i], pads[i + nd]]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}.get(mode)
    if torch_mode is None:
        raise GraphpruneError(f"Pad mode {mode} is not supported by the trainable module")
    return F.pad(x, spec, mode=torch_mode, value=value) if torch_mode == "constant" else F.pad(x, spec, mode=torch_mode)


def _layer_norm(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = int(ctx.a("axis", -1)) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, float(ctx.a("epsilon", 1e-5)))


def _flatten(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x = ins[0]
    axis = int(ctx.a("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _cast(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    to = _DTYPES.get(int(ctx.a("to")))
    if to is None:
        raise GraphpruneError(f"Cast to ONNX type {ctx.a('to')} is not supported by the trainable module")
    return ins[0].to(to)


def _shape(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    dims = list(ins[0].shape)[ctx.a("start", 0): ctx.a("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=ins[0].device)


def _expand(_ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    shape = _ints(ins[1])
    x = ins[0]
    rank = max(x.dim(), len(shape))
    full = [1] * (rank - len(shape)) + shape
    have = [1] * (rank - x.dim()) + list(x.shape)
    return x.reshape(have).expand([max(a, b) if a == 1 or b == 1 else a for a, b in zip(have, full)])


def _bn(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    x, scale, bias, mean, var = ins[:5]
    train = getattr(ctx, "train_bn", False)
    return F.batch_norm(x, mean, var, scale, bias, training=train, momentum=0.1, eps=float(ctx.a("epsilon", 1e-5)))


def _instance_norm(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    return F.instance_norm(ins[0], weight=ins[1], bias=ins[2], eps=float(ctx.a("epsilon", 1e-5)))


def _const_of_shape(ctx: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
    value = ctx.a("value")
    arr = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    return torch.full(_ints(ins[0]), arr.reshape(-1)[0].item(), dtype=torch.from_numpy(arr).dtype, device=ins[0].device)


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda _c, _n, ins: fn(ins[0])


def _binary(fn: Callable[[Any, Any], torch.Tensor]) -> OpFn:
    return lambda _c, _n, ins: fn(ins[0], ins[1])


def _variadic(fn: Callable[[Any, Any], torch.Tensor]) -> OpFn:
    def run(_c: _Ctx, _n: onnx.NodeProto, ins: list[Any]) -> torch.Tensor:
        out = ins[0]
        for v in ins[1:]:
            out = fn(out, v)
        return out
    return run


# ONNX op type -> torch implementation; the one table of what the trainable module can execute
OPS: dict[str, OpFn] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "BatchNormalization": _bn, "InstanceNormalization": _instance_norm, "LayerNormalization": _layer_norm,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": lambda _c, _n, ins: (torch.div(ins[0], ins[1], rounding_mode="trunc")
                                if not ins[0].is_floating_point() else ins[0] / ins[1]),
    "Pow": _binary(torch.pow), "Sum": _variadic(torch.add), "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp),
    "Log": _unary(torch.log), "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Erf": _unary(torch.erf),
    "Reciprocal": _unary(torch.reciprocal), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Softplus": _unary(F.softplus), "Identity": _unary(lambda x: x), "Dropout": _unary(lambda x: x),
    "LeakyRelu": lambda c, _n, ins: F.leaky_relu(ins[0], float(c.a("alpha", 0.01))),
    "Elu": lambda c, _n, ins: F.elu(ins[0], float(c.a("alpha", 1.0))),
    "PRelu": lambda _c, _n, ins: torch.where(ins[0] >= 0, ins[0], ins[0] * ins[1]),
    "HardSigmoid": lambda c, _n, ins: torch.clamp(float(c.a("alpha", 0.2)) * ins[0] + float(c.a("beta", 0.5)), 0, 1),
    "HardSwish": _unary(F.hardswish), "Gelu": lambda c, _n, ins: F.gelu(
        ins[0], approximate="tanh" if c.a("approximate", b"none") in (b"tanh", "tanh") else "none"),
    "Clip": _clip, "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "AveragePool": _pool("avg"), "MaxPool": _pool("max"),
    "ReduceMean": _reduce(torch.mean, 18), "ReduceSum": _reduce(torch.sum, 13),
    "ReduceMax": _reduce(torch.amax, 18), "ReduceMin": _reduce(torch.amin, 18),
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": lambda c, _n, ins: ins[0].permute(
        *(c.a("perm") or list(reversed(range(ins[0].dim()))))),
    "Concat": lambda c, _n, ins: torch.cat([v for v in ins if v is not None], dim=int(c.a("axis"))),
    "Slice": _slice, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Gather": _gather, "Split": _split,
    "Pad": _pad, "Shape": _shape, "Cast": _cast, "Expand": _expand, "ConstantOfShape": _const_of_shape,
    "Equal": _binary(torch.eq), "Where": lambda _c, _n, ins: torch.where(ins[0], ins[1], ins[2]),
}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for at in node.attribute:
        out[at.name] = helper.get_attribute_value(at)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def trainable_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(trained weights, running statistics): float initializers with more than one element, except the
    BatchNorm mean/var slots; scalars (epsilons, exponents) and integer tensors stay constants."""
    inits = {t.name: t for t in model.graph.initializer}
    stats = {n.input[i] for n in model.graph.node for i in _STAT_SLOTS.get(n.op_type, ()) if i < len(n.input)}
    weights = []
    for name, t in inits.items():
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16) and int(np.prod(t.dims)) > 1 and name not in stats:
            weights.append(name)
    return weights, sorted(s for s in stats if s in inits)


# Weighted ops whose initializer inputs become the parameters of a per-node layer module, by input slot:
# what an nn.Module would hold as a Conv2d/Linear/BatchNorm2d (the training-based methods hook those)
LAYER_SLOTS: dict[str, dict[int, str]] = {
    "Conv": {1: "weight", 2: "bias"}, "ConvTranspose": {1: "weight", 2: "bias"}, "Gemm": {1: "weight", 2: "bias"},
    "MatMul": {1: "weight"}, "BatchNormalization": {1: "weight", 2: "bias"},
    "InstanceNormalization": {1: "weight", 2: "bias"}, "LayerNormalization": {1: "weight", 2: "bias"},
}


def _out_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The axis of a layer's weight that indexes its output channels (what a gate folds into)."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "MatMul":
        return ndim - 1
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return 0 if trans_b else ndim - 1
    return 0


class NodeLayer(nn.Module):
    """One weighted ONNX node as a module, so forward hooks and parameter-owning layers exist as in an
    nn.Module: `weight` (input 1) and `bias` (input 2) when they are initializers this node owns;
    `out_axis` says which axis of `weight` holds the output channels (0 for Conv, the last for MatMul)."""

    def __init__(self, node: onnx.NodeProto, ctx: _Ctx, onnx_names: dict[str, str]) -> None:
        super().__init__()
        self.node, self.ctx = node, ctx
        self.onnx_names = onnx_names  # attribute -> initializer name
        self.out_axis = 0

    def forward(self, *ins: Any) -> Any:
        return OPS[self.node.op_type](self.ctx, self.node, list(ins))


def _layer_key(node: onnx.NodeProto, k: int, used: set[str]) -> str:
    base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in (node.name or f"{node.op_type}_{k}")) or f"n{k}"
    key, i = base, 1
    while key in used:
        key, i = f"{base}_{i}", i + 1
    used.add(key)
    return key


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; float weights are parameters named after their initializers.

    Every weighted node (LAYER_SLOTS) is a `NodeLayer` submodule in `layers` that owns its weight and
    bias, so hooks on layer outputs and per-layer parameters work as on an nn.Module;
    `weights_by_name()` maps the ONNX initializer names (what graphprune's analysis binds) to the
    parameters and `module_of(name)` names the layer owning one. `taps` names intermediate tensors to
    keep from the last forward (feature matching, logits before a final Softmax) in `captured`.
    `train_bn=False` (default) keeps BatchNorm on its running statistics in training too (a short
    distillation on few samples should not re-estimate them).
    """

    def __init__(self, model: onnx.ModelProto, train_bn: bool = False) -> None:
        super().__init__()
        opset = _opset(model)
        missing = sorted({n.op_type for n in model.graph.node
                          if n.op_type not in OPS and n.op_type != "Constant" or n.domain not in ("", "ai.onnx")})
        if missing:
            raise GraphpruneError(f"cannot fine-tune this model: op(s) {', '.join(missing)} not supported by the "
                                  "trainable ONNX module (graphprune/frontends/onnx_torch.py)")
        weights, stats = trainable_names(model)
        self.weight_names = weights
        self.stat_names = stats
        wanted = set(weights)
        values = {name: _init(model, name) for name in weights}
        self.layers = nn.ModuleDict()
        self.params = nn.ParameterList()
        self._slot: dict[str, tuple[str, Any]] = {}
        self._owner: dict[str, str] = {}  # initializer -> layer key
        self._layer_of: dict[int, str] = {}  # node index -> layer key
        self._nodes: list[tuple[onnx.NodeProto, _Ctx]] = []
        used: set[str] = set()
        for k, node in enumerate(model.graph.node):
            ctx = _Ctx(opset)
            ctx.attrs = _attrs(node)
            if node.op_type == "Constant":
                arr = _constant_value(node)
                self.register_buffer(f"k{k}", torch.from_numpy(np.asarray(arr).copy()))
            self._nodes.append((node, ctx))
            slots = LAYER_SLOTS.get(node.op_type)
            if not slots:
                continue
            if len(node.input) < 2 or node.input[1] not in wanted:
                continue  # e.g. a MatMul of two activations: no layer weight to own or hook
            # a weight shared with an earlier node stays that node's (one parameter per initializer)
            mine = {attr: node.input[i] for i, attr in slots.items()
                    if i < len(node.input) and node.input[i] in wanted and node.input[i] not in self._slot}
            key = _layer_key(node, k, used)
            layer = NodeLayer(node, ctx, mine)
            for attr, name in mine.items():
                setattr(layer, attr, _parameter(values[name]))
                self._slot[name] = ("m", (key, attr))
                self._owner[name] = key
            if "weight" in mine:
                layer.out_axis = _out_axis(node, getattr(layer, "weight").dim())
            self.layers[key] = layer
            self._layer_of[k] = key
        for name in weights:
            if name not in self._slot:
                self._slot[name] = ("p", len(self.params))
                self.params.append(_parameter(values[name]))
        consts = [t.name for t in model.graph.initializer if t.name not in self._slot]
        for i, name in enumerate(consts):
            arr = numpy_helper.to_array(_init(model, name)).copy()
            self.register_buffer(f"c{i}", torch.from_numpy(np.asarray(arr)) if arr.dtype != object else torch.zeros(0))
            self._slot[name] = ("b", i)
        self.input_names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        self.output_names = [o.name for o in model.graph.output]
        self.train_bn = train_bn
        self.taps: set[str] = set()
        self.captured: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        kind, where = self._slot[name]
        if kind == "m":
            key, attr = where
            return getattr(self.layers[key], attr)
        return self.params[where] if kind == "p" else getattr(self, f"c{where}")

    def weights_by_name(self) -> dict[str, torch.Tensor]:
        """Trained weights under their ONNX initializer names (the names graphprune's analysis binds)."""
        return {name: self.tensor(name) for name in self.weight_names}

    def module_of(self, name: str) -> str | None:
        """Qualified name of the layer module owning initializer `name` (None: not a layer's weight)."""
        key = self._owner.get(name)
        return f"layers.{key}" if key is not None else None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: Env = dict(zip(self.input_names, inputs))
        self.captured = {}
        train_bn = self.train_bn and self.training
        for k, (node, ctx) in enumerate(self._nodes):
            if node.op_type == "Constant":
                env[node.output[0]] = getattr(self, f"k{k}")
                continue
            ins = [None if not name else (env[name] if name in env else self.tensor(name)) for name in node.input]
            ctx.train_bn = train_bn  # type: ignore[attr-defined]
            key = self._layer_of.get(k)
            out = self.layers[key](*ins) if key is not None else OPS[node.op_type](ctx, node, ins)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(node.output, outs):
                if name:
                    env[name] = value
                    if name in self.taps:
                        self.captured[name] = value
        return tuple(env[name] for name in self.output_names)


def _parameter(t: onnx.TensorProto) -> nn.Parameter:
    v = torch.from_numpy(numpy_helper.to_array(t).copy())
    return nn.Parameter(v.float() if v.dtype != torch.float64 else v)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for t in model.graph.initializer:
        if t.name == name:
            return t
    raise KeyError(name)


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for at in node.attribute:
        if at.name == "value":
            return numpy_helper.to_array(at.t)
        if at.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(at), dtype=np.float32 if at.name == "value_float" else np.int64)
        if at.name in ("value_floats", "value_ints"):
            return np.asarray(helper.get_attribute_value(at), dtype=np.float32 if at.name == "value_floats" else np.int64)
    raise GraphpruneError(f"Constant node {node.name or node.output[0]} has no supported value attribute")


def export_onnx(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (the graph the module was built from) with the module's trained weights and,
    when BatchNorm statistics were trained, its running statistics; everything else is untouched."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = set(module.weight_names) | (set(module.stat_names) if module.train_bn else set())
    for t in out.graph.initializer:
        if t.name in names:
            value = module.tensor(t.name).detach().cpu()
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            t.CopyFrom(numpy_helper.from_array(value.contiguous().numpy().astype(dtype), t.name))
    return out
