"""PyTorch frontend: capture an nn.Module as an fx graph and lower it into the same IR as ONNX.

Capture is torch.fx symbolic tracing; when that fails (data-dependent Python such as iterating a
tensor, as in Ultralytics' C2f), non-strict `torch.export` is the fallback. Either way the result is
a torch.fx GraphModule whose nodes are lowered, one small converter per op, into the op types the
rule table (graphprune/analysis/rules.py) already knows, so grouping logic exists once. Functional
calls on a module's own parameters (`F.conv2d`, `F.batch_norm`, `F.linear`, `F.layer_norm`,
`F.group_norm`, as timm's BatchNormAct2d does) lower to the same IR ops as the modules, so their
parameters are bound and sliced like any other.

Constants are numpy copies of the parameters and buffers, keyed by their `named_parameters()` /
`named_buffers()` names; shapes come from running the example inputs through the captured graph
(ShapeProp). `TracedModule.origin` maps every IR node back to the fx node (and module) it came
from, which is what the torch rewriter edits.
"""
from __future__ import annotations

import contextlib
import copy
import io
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS
from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.ir.graph import Graph, Node

FX = "torch.fx"
EXPORT = "torch.export"


@dataclass
class TracedModule:
    """A captured module, its IR, and where each IR node came from."""

    root: nn.Module
    gm: torch.fx.GraphModule
    graph: Graph
    origin: dict[str, torch.fx.Node] = field(default_factory=dict)  # IR node name -> fx node
    inputs: tuple = ()
    tensor_fx: dict[str, torch.fx.Node] = field(default_factory=dict)  # IR tensor -> fx node computing it
    frontend: str = FX  # which capture produced `gm`: "torch.fx" or "torch.export"
    fallback_reason: str = ""  # why torch.fx was not used, when it was not


# ---------------------------------------------------------------------------------------------
# op tables: torch module types -> IR op types
# ---------------------------------------------------------------------------------------------
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "Relu", nn.ReLU6: "Clip", nn.SiLU: "Swish", nn.GELU: "Gelu", nn.Hardswish: "HardSwish",
    nn.Hardsigmoid: "HardSigmoid", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.LeakyReLU: "LeakyRelu",
    nn.ELU: "Elu", nn.SELU: "Selu", nn.CELU: "Celu", nn.Mish: "Mish", nn.Softplus: "Softplus",
    nn.Hardtanh: "Clip", nn.PReLU: "PRelu",
}
_PASS_MODULES = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)


def _fname(node: torch.fx.Node) -> str:
    """The op's name: a method name, a function's __name__, or 'aten.<op>' for an ATen overload."""
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return "aten." + node.target._overloadpacket.__name__
    return getattr(node.target, "__name__", str(node.target))


def _bare(node: torch.fx.Node) -> str:
    """The op's name without the 'aten.' prefix or an in-place trailing underscore (`relu_` -> `relu`)."""
    name = _fname(node).removeprefix("aten.")
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _meta_shapes(node: torch.fx.Node) -> Any:
    """Tensor shape, a list of shapes (tuple outputs), or None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape)
    if isinstance(meta, (list, tuple)):
        return [tuple(int(d) for d in m.shape) if hasattr(m, "shape") else None for m in meta]
    return None


class _Lowering:
    """Walks the fx graph once, emitting IR nodes through the converter tables."""

    def __init__(self, root: nn.Module, gm: torch.fx.GraphModule) -> None:
        self.root, self.gm = root, gm
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.env: dict[torch.fx.Node, Any] = {}  # fx node -> tensor name, or list of names (tuple outputs)
        self.origin: dict[str, torch.fx.Node] = {}
        # canonical names: a tensor shared under two names is bound once, under its first name
        self.pname: dict[int, str] = {}
        named = list(root.named_parameters()) + list(root.named_buffers())
        for name, t in named:
            self.pname.setdefault(id(t), name)
        for name, t in named:
            if self.pname[id(t)] == name:
                self.constants[name] = t.detach().cpu().numpy().copy()
        if gm is not root:  # torch.export's module holds its own copies, under the same qualified names
            for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
                if name in self.constants:
                    self.pname.setdefault(id(t), name)
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    # -- helpers -------------------------------------------------------------------------------
    def tensor_of(self, a: Any) -> str | None:
        if isinstance(a, torch.fx.Node):
            v = self.env.get(a)
            return v if isinstance(v, str) else None
        return None

    def shape_of(self, t: str) -> tuple[int, ...]:
        return tuple(self.constants[t].shape) if t in self.constants else self.shapes.get(t, ())

    def param(self, module: nn.Module, attr: str) -> str:
        t = getattr(module, attr, None)
        if t is None:
            return ""
        return self.pname[id(t)]

    def const(self, name: str, value: np.ndarray) -> str:
        self.constants[name] = np.asarray(value)
        return name

    def emit(self, fx: torch.fx.Node, op: str, inputs: list[str], attrs: dict | None = None,
             domain: str = "") -> None:
        shape = _meta_shapes(fx)
        if isinstance(shape, list):
            outs = [f"{fx.name}:{k}" for k in range(len(shape))]
            for o, s in zip(outs, shape):
                if s is not None:
                    self.shapes[o] = s
            self.env[fx] = outs
        else:
            outs = [fx.name]
            if shape is not None:
                self.shapes[fx.name] = shape
            self.env[fx] = fx.name
        self.nodes.append(Node(fx.name, op, inputs, outs, attrs or {}, domain))
        self.origin[fx.name] = fx

    def inner(self, fx: torch.fx.Node, suffix: str, op: str, inputs: list[str], shape: tuple[int, ...],
              attrs: dict | None = None) -> str:
        """An IR node with no fx node of its own (one step of a decomposed call); returns its output."""
        name = f"{fx.name}__{suffix}"
        self.shapes[name] = tuple(shape)
        self.nodes.append(Node(name, op, inputs, [name], attrs or {}, ""))
        return name

    def unknown(self, fx: torch.fx.Node, label: str, extra: list[str] = ()) -> None:
        ins = [t for t in (self.tensor_of(a) for a in _flat_args(fx)) if t]
        self.emit(fx, label, ins + [e for e in extra if e], domain="torch")

    def constant_operands(self, *args: Any) -> list[str] | None:
        """IR names of parameter operands (None -> ""), or None when one is computed at run time."""
        out = []
        for a in args:
            if a is None:
                out.append("")
                continue
            t = self.tensor_of(a)
            if t is None or t not in self.constants:
                return None
            out.append(t)
        return out

    # -- lowering ------------------------------------------------------------------------------
    def run(self) -> None:
        for fx in self.gm.graph.nodes:
            if fx.op == "placeholder":
                shape = _meta_shapes(fx)
                if isinstance(shape, tuple):
                    self.env[fx] = fx.name
                    self.shapes[fx.name] = shape
                    self.inputs.append(fx.name)
            elif fx.op == "get_attr":
                self.get_attr(fx)
            elif fx.op == "call_module":
                self.call_module(fx)
            elif fx.op in ("call_function", "call_method"):
                if _meta_shapes(fx) is None and fx.target is not operator.getitem:
                    continue  # sizes, python scalars: they adapt at run time
                self.call_function(fx)
            elif fx.op == "output":
                self.outputs = [t for t in (self.tensor_of(a) for a in _flat_args(fx)) if t]

    def get_attr(self, fx: torch.fx.Node) -> None:
        value = self.gm
        for part in str(fx.target).split("."):
            value = getattr(value, part)
        if not isinstance(value, torch.Tensor):
            return
        name = self.pname.get(id(value))
        if name is None:
            name = self.const(str(fx.target), value.detach().cpu().numpy().copy())
        self.env[fx] = name

    def call_module(self, fx: torch.fx.Node) -> None:
        m = self.gm.get_submodule(str(fx.target))
        x = self.tensor_of(fx.args[0]) if fx.args else None
        for kind, convert in _MODULE_CONVERTERS:
            if isinstance(m, kind):
                if x is not None and convert(self, fx, m, x) is not False:
                    return
                break
        if type(m) in _ACT_MODULES and x:
            return self.emit(fx, _ACT_MODULES[type(m)], [x] + ([self.param(m, "weight")] if isinstance(m, nn.PReLU) else []))
        params = [self.pname[id(t)] for t in list(m.parameters()) + list(m.buffers()) if id(t) in self.pname]
        if _meta_shapes(fx) is None and not params:
            return  # a guard or other call with no tensor result (torch.export's _guards_fn)
        self.unknown(fx, type(m).__name__, params)

    def call_function(self, fx: torch.fx.Node) -> None:
        name = _fname(fx)
        convert = _CONVERTERS.get(name) or _CONVERTERS.get(_bare(fx))
        if convert is None:
            return self.unknown(fx, name)
        convert(self, fx)


# ---------------------------------------------------------------------------------------------
# converters: one small function per op (torch function / method name, or 'aten.<op>' where the
# ATen signature differs from the functional one); each emits IR nodes or calls `unknown`
# ---------------------------------------------------------------------------------------------
Converter = Callable[[_Lowering, torch.fx.Node], None]
_CONVERTERS: dict[str, Converter] = {}


def converts(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for torch functions/methods called `names` (in-place `op_` forms included)."""
    def register(fn: Converter) -> Converter:
        for n in names:
            _CONVERTERS[n] = fn
        return fn
    return register


def _x(fx: torch.fx.Node, low: _Lowering) -> str | None:
    return low.tensor_of(fx.args[0]) if fx.args else None


def _rank(low: _Lowering, t: str) -> int:
    return len(low.shape_of(t))


_ELEMENTWISE: dict[str, str] = {
    "relu": "Relu", "relu6": "Clip", "silu": "Swish", "gelu": "Gelu", "hardswish": "HardSwish",
    "hardsigmoid": "HardSigmoid", "sigmoid": "Sigmoid", "tanh": "Tanh", "leaky_relu": "LeakyRelu",
    "elu": "Elu", "selu": "Selu", "celu": "Celu", "mish": "Mish", "softplus": "Softplus", "hardtanh": "Clip",
    "clamp": "Clip", "clamp_min": "Clip", "clamp_max": "Clip", "clip": "Clip", "exp": "Exp", "log": "Log",
    "sqrt": "Sqrt", "rsqrt": "Reciprocal", "abs": "Abs", "neg": "Neg", "sin": "Sin", "cos": "Cos", "erf": "Erf",
    "reciprocal": "Reciprocal", "pow": "Pow", "square": "Mul", "prelu": "PRelu",
    "add": "Add", "iadd": "Add", "sub": "Sub", "isub": "Sub", "rsub": "Sub", "mul": "Mul", "imul": "Mul",
    "truediv": "Div", "itruediv": "Div", "div": "Div", "maximum": "Max", "minimum": "Min",
}
_PASSTHROUGH: dict[str, str] = {
    "stochastic_depth": "Identity", "dropout": "Dropout", "dropout2d": "Dropout", "feature_dropout": "Dropout",
    "adaptive_avg_pool1d": "AveragePool", "adaptive_avg_pool2d": "AveragePool",
    "adaptive_avg_pool3d": "AveragePool", "adaptive_max_pool2d": "MaxPool", "avg_pool2d": "AveragePool",
    "max_pool2d": "MaxPool", "avg_pool1d": "AveragePool", "max_pool1d": "MaxPool", "max_pool3d": "MaxPool",
    "avg_pool3d": "AveragePool", "interpolate": "Resize", "upsample": "Resize", "upsample_nearest2d": "Resize",
    "upsample_bilinear2d": "Resize", "_adaptive_avg_pool2d": "AveragePool", "mean_pool": "AveragePool",
}
_ALIAS = ("contiguous", "clone", "detach", "to", "float", "type_as", "_to_copy", "alias", "lift_fresh_copy")
_CREATORS = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like", "rand",
             "randn", "rand_like", "randn_like", "arange", "linspace", "eye", "new_zeros", "new_ones", "new_full",
             "new_empty", "scalar_tensor", "tensor")
_REDUCE = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin"}
_LAYOUT = {"flatten": "Flatten", "squeeze": "Squeeze", "unsqueeze": "Unsqueeze"}


def _elementwise(low: _Lowering, fx: torch.fx.Node) -> None:
    ins = [t for t in (low.tensor_of(a) for a in list(fx.args) + list(fx.kwargs.values())) if t]
    if not ins:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, _ELEMENTWISE[_bare(fx)], ins)


def _passthrough(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, _PASSTHROUGH[_bare(fx)], [x])


def _alias(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is not None and len(_flat_args(fx)) == 1:
        low.env[fx] = x  # no-ops for channels: keep layout chains (e.g. channel shuffle) unbroken
    elif x is not None:
        low.emit(fx, "Identity", [x])
    else:
        low.unknown(fx, _fname(fx))


def _creator(low: _Lowering, fx: torch.fx.Node) -> None:
    """Tensors made from a shape alone carry no channels (anchors grids, masks, zeros)."""
    low.emit(fx, "ConstantOfShape", [])


converts(*_ELEMENTWISE)(_elementwise)
converts(*_PASSTHROUGH)(_passthrough)
converts(*_ALIAS)(_alias)
converts(*_CREATORS)(_creator)


@converts("pad", "constant_pad_nd")
def _pad(low: _Lowering, fx: torch.fx.Node) -> None:
    """F.pad(x, (last_lo, last_hi, prev_lo, prev_hi, ...)) as an ONNX Pad over all axes."""
    x = _x(fx, low)
    pads = _arg(fx.args, fx.kwargs, 1, "pad", None)
    if x is None or pads is None or any(not isinstance(p, int) for p in pads):
        return low.unknown(fx, _fname(fx))
    rank = _rank(low, x)
    lo, hi = [0] * rank, [0] * rank
    for k in range(len(pads) // 2):
        lo[rank - 1 - k], hi[rank - 1 - k] = int(pads[2 * k]), int(pads[2 * k + 1])
    low.emit(fx, "Pad", [x], {"pads": lo + hi})


@converts("getitem")
def _getitem(low: _Lowering, fx: torch.fx.Node) -> None:
    src, idx = fx.args
    v = low.env.get(src)
    if isinstance(v, list):
        low.env[fx] = v[idx]  # one output of a split/chunk or tuple-returning module
        return
    if not isinstance(v, str) or _meta_shapes(fx) is None:
        return
    shape = low.shape_of(v)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, torch.fx.Node) or i is None or i is Ellipsis for i in idx) or len(idx) > len(shape):
        return low.unknown(fx, "getitem")
    ints = [k for k, i in enumerate(idx) if isinstance(i, int)]
    slices = [(k, i) for k, i in enumerate(idx) if isinstance(i, slice)]
    if any(isinstance(b, torch.fx.Node) for _, s in slices for b in (s.start, s.stop, s.step)):
        return low.unknown(fx, "getitem")
    if len(ints) == 1 and all(s == slice(None) for _, s in slices):
        k = ints[0]
        index = low.const(f"{fx.name}__index", np.array(idx[k] % shape[k], dtype=np.int64))
        return low.emit(fx, "Gather", [v, index], {"axis": k})
    if ints:
        return low.unknown(fx, "getitem")
    starts, ends, axes, steps = [], [], [], []
    for k, s in slices:
        lo, hi, st = s.indices(shape[k])
        if (lo, hi, st) != (0, shape[k], 1):
            starts.append(lo)
            ends.append(hi)
            axes.append(k)
            steps.append(st)
    low.emit(fx, "Slice", [v], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})


@converts("aten.slice")
def _aten_slice(low: _Lowering, fx: torch.fx.Node) -> None:
    """aten.slice(x, dim, start, end, step): one axis of a Python slice (torch.export)."""
    x = _x(fx, low)
    if x is None or any(isinstance(a, torch.fx.Node) for a in fx.args[1:]):
        return low.unknown(fx, "slice")
    shape = low.shape_of(x)
    dim = int(_arg(fx.args, fx.kwargs, 1, "dim", 0)) % len(shape)
    lo, hi, st = slice(_arg(fx.args, fx.kwargs, 2, "start", None), _arg(fx.args, fx.kwargs, 3, "end", None),
                       _arg(fx.args, fx.kwargs, 4, "step", 1)).indices(shape[dim])
    if (lo, hi, st) == (0, shape[dim], 1):
        low.env[fx] = x
        return
    low.emit(fx, "Slice", [x], {"starts": [lo], "ends": [hi], "axes": [dim], "steps": [st]})


@converts("aten.select")
def _aten_select(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None or isinstance(fx.args[2], torch.fx.Node):
        return low.unknown(fx, "select")
    shape = low.shape_of(x)
    dim = int(fx.args[1]) % len(shape)
    index = low.const(f"{fx.name}__index", np.array(int(fx.args[2]) % shape[dim], dtype=np.int64))
    low.emit(fx, "Gather", [x, index], {"axis": dim})


@converts("cat", "concat", "concatenate")
def _cat(low: _Lowering, fx: torch.fx.Node) -> None:
    tensors = [low.tensor_of(a) for a in fx.args[0]]
    if any(t is None for t in tensors):
        return low.unknown(fx, _fname(fx))
    low.emit(fx, "Concat", tensors, {"axis": int(_arg(fx.args, fx.kwargs, 1, "dim", 0))})


@converts("split", "chunk", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk")
def _split(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    shapes = _meta_shapes(fx)
    if x is None or not isinstance(shapes, list):
        return low.unknown(fx, _fname(fx))
    dim = int(_arg(fx.args, fx.kwargs, 2, "dim", 0)) % _rank(low, x)
    low.emit(fx, "Split", [x], {"axis": dim, "split": [s[dim] for s in shapes]})


@converts(*_REDUCE)
def _reduce(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    rank = _rank(low, x)
    dims = _arg(fx.args, fx.kwargs, 1, "dim", None)
    keep = bool(_arg(fx.args, fx.kwargs, 2, "keepdim", False))
    axes = list(range(rank)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    if not axes:
        axes = list(range(rank))
    low.emit(fx, _REDUCE[_bare(fx)], [x], {"axes": axes, "keepdims": int(keep)})


@converts("softmax", "log_softmax", "_softmax")
def _softmax(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, "Softmax", [x], {"axis": int(_arg(fx.args, fx.kwargs, 1, "dim", -1))})


@converts("view", "reshape", "_unsafe_view", "view_as", "reshape_as")
def _reshape(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    shape_const = low.const(f"{fx.name}__shape", np.array(_meta_shapes(fx), dtype=np.int64))
    low.emit(fx, "Reshape", [x, shape_const])


@converts(*_LAYOUT)
def _layout(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, _LAYOUT[_bare(fx)], [x])


@converts("permute", "transpose", "swapaxes", "t")
def _transpose(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    if x is None:
        return low.unknown(fx, _fname(fx))
    rank = _rank(low, x)
    args = fx.args
    name = _bare(fx)
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) > 1 and not isinstance(args[1], (list, tuple))) else \
            (args[1] if len(args) > 1 else fx.kwargs.get("dims"))
        perm = [int(d) % rank for d in dims]
    else:
        a, b = (int(args[1]) % rank, int(args[2]) % rank) if name != "t" else (0, rank - 1)
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    low.emit(fx, "Transpose", [x], {"perm": perm})


@converts("matmul", "mm", "bmm")
def _matmul(low: _Lowering, fx: torch.fx.Node) -> None:
    a, b = _x(fx, low), low.tensor_of(fx.args[1]) if len(fx.args) > 1 else None
    if a is None or b is None:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, "MatMul", [a, b])


@converts("linear")
def _linear(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    params = low.constant_operands(fx.args[1], _arg(fx.args, fx.kwargs, 2, "bias", None))
    if x is None or params is None or not params[0]:
        return low.unknown(fx, "linear")
    op, attrs = ("Gemm", {"transB": 1}) if _rank(low, x) == 2 else ("Linear", {})
    low.emit(fx, op, [x, *params], attrs)


@converts("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv(low: _Lowering, fx: torch.fx.Node) -> None:
    """F.conv*d / F.conv_transpose*d(x, weight, bias, ..., groups as argument 6) on own parameters."""
    x = _x(fx, low)
    params = low.constant_operands(fx.args[1], _arg(fx.args, fx.kwargs, 2, "bias", None))
    if x is None or params is None:
        return low.unknown(fx, _fname(fx))
    op = "ConvTranspose" if _bare(fx).startswith("conv_transpose") else "Conv"
    low.emit(fx, op, [x, *params], {"group": int(_arg(fx.args, fx.kwargs, 6, "groups", 1))})


def _batch_norm(low: _Lowering, fx: torch.fx.Node, weight: Any, bias: Any, mean: Any, var: Any) -> None:
    x = _x(fx, low)
    params = low.constant_operands(weight, bias, mean, var)
    if x is None or params is None:
        return low.unknown(fx, _fname(fx))
    low.emit(fx, "BatchNormalization", [x, *params])


@converts("batch_norm")
def _f_batch_norm(low: _Lowering, fx: torch.fx.Node) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): per-channel either way."""
    a, k = fx.args, fx.kwargs
    _batch_norm(low, fx, _arg(a, k, 3, "weight", None), _arg(a, k, 4, "bias", None),
                _arg(a, k, 1, "running_mean", None), _arg(a, k, 2, "running_var", None))


@converts("aten.batch_norm", "aten._native_batch_norm_legit_no_training")
def _aten_batch_norm(low: _Lowering, fx: torch.fx.Node) -> None:
    """aten.batch_norm(x, weight, bias, running_mean, running_var, ...) (torch.export)."""
    a, k = fx.args, fx.kwargs
    _batch_norm(low, fx, _arg(a, k, 1, "weight", None), _arg(a, k, 2, "bias", None),
                _arg(a, k, 3, "running_mean", None), _arg(a, k, 4, "running_var", None))


@converts("layer_norm")
def _layer_norm(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    ns = _arg(fx.args, fx.kwargs, 1, "normalized_shape", ())
    params = low.constant_operands(_arg(fx.args, fx.kwargs, 2, "weight", None),
                                   _arg(fx.args, fx.kwargs, 3, "bias", None))
    if x is None or params is None:
        return low.unknown(fx, "layer_norm")
    low.emit(fx, "LayerNormalization", [x, *params], {"axis": -len(ns)})


@converts("group_norm")
def _group_norm(low: _Lowering, fx: torch.fx.Node) -> None:
    x = _x(fx, low)
    params = low.constant_operands(_arg(fx.args, fx.kwargs, 2, "weight", None),
                                   _arg(fx.args, fx.kwargs, 3, "bias", None))
    if x is None or params is None:
        return low.unknown(fx, "group_norm")
    low.emit(fx, "GroupNormalization", [x, *params])


@converts("scaled_dot_product_attention")
def _sdpa(low: _Lowering, fx: torch.fx.Node) -> None:
    """softmax(q @ k^T + mask) @ v, spelled as the MatMul/Softmax nodes an ONNX export has, so
    both paths count the same attention MACs (and freeze the same channels)."""
    q, k, v = (low.tensor_of(a) for a in fx.args[:3])
    mask = low.tensor_of(_arg(fx.args, fx.kwargs, 3, "attn_mask", None))
    if q is None or k is None or v is None:
        return low.unknown(fx, "scaled_dot_product_attention")
    qs, ks = low.shape_of(q), low.shape_of(k)
    perm = list(range(len(ks)))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = low.inner(fx, "kT", "Transpose", [k], [ks[p] for p in perm], {"perm": perm})
    scores_shape = tuple(np.broadcast_shapes(qs[:-2], ks[:-2])) + (qs[-2], ks[-2])
    scores = low.inner(fx, "qk", "MatMul", [q, kt], scores_shape)
    if mask is not None:
        scores = low.inner(fx, "mask", "Add", [scores, mask], scores_shape)
    probs = low.inner(fx, "softmax", "Softmax", [scores], scores_shape, {"axis": -1})
    low.emit(fx, "MatMul", [probs, v])


# -- modules ----------------------------------------------------------------------------------
ModuleConverter = Callable[[_Lowering, torch.fx.Node, nn.Module, str], "bool | None"]


def _m_conv(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    p = lambda a: low.param(m, a)  # noqa: E731
    low.emit(fx, "ConvTranspose" if m.transposed else "Conv", [x, p("weight"), p("bias")], {"group": m.groups})


def _m_batchnorm(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> bool | None:
    if not m.track_running_stats:
        return False
    p = lambda a: low.param(m, a)  # noqa: E731
    low.emit(fx, "BatchNormalization", [x, p("weight"), p("bias"), p("running_mean"), p("running_var")])
    return None


def _m_linear(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    op, attrs = ("Gemm", {"transB": 1}) if _rank(low, x) == 2 else ("Linear", {})
    low.emit(fx, op, [x, low.param(m, "weight"), low.param(m, "bias")], attrs)


def _m_layernorm(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    low.emit(fx, "LayerNormalization", [x, low.param(m, "weight"), low.param(m, "bias")],
             {"axis": -len(m.normalized_shape)})


def _m_groupnorm(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    low.emit(fx, "GroupNormalization", [x, low.param(m, "weight"), low.param(m, "bias")])


def _m_identity(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    low.emit(fx, "Identity", [x])


def _m_flatten(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    low.emit(fx, "Flatten", [x])


def _m_softmax(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> None:
    low.emit(fx, "Softmax", [x], {"axis": m.dim if m.dim is not None else -1})


def _m_mha(low: _Lowering, fx: torch.fx.Node, m: nn.Module, x: str) -> bool | None:
    """nn.MultiheadAttention stays whole (frozen) but its projections and attention products are
    counted: the 'MultiheadAttention' rule reads these attributes."""
    q, k, v = (low.tensor_of(a) for a in (list(fx.args) + [None, None, None])[:3])
    if q is None or k is None or v is None:
        return False
    params = [low.pname[id(t)] for t in list(m.parameters()) + list(m.buffers()) if id(t) in low.pname]
    low.emit(fx, "MultiheadAttention", [q, k, v, *params],
             {"embed_dim": m.embed_dim, "num_heads": m.num_heads, "batch_first": int(m.batch_first),
              "kdim": m.kdim, "vdim": m.vdim})
    return None


_MODULE_CONVERTERS: list[tuple[type | tuple[type, ...], ModuleConverter]] = [
    (nn.modules.conv._ConvNd, _m_conv),
    ((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm), _m_batchnorm),
    (nn.Linear, _m_linear),
    (nn.LayerNorm, _m_layernorm),
    (nn.GroupNorm, _m_groupnorm),
    (_PASS_MODULES, _m_identity),
    (nn.Flatten, _m_flatten),
    ((nn.Softmax, nn.LogSoftmax), _m_softmax),
    (nn.MultiheadAttention, _m_mha),
]


def _arg(args: tuple, kwargs: dict, pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def _flat_args(fx: torch.fx.Node) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_arg((fx.args, fx.kwargs), lambda n: out.append(n))
    return out


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise GraphpruneError("pruning an nn.Module needs example_inputs (a tensor or a tuple of tensors)")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode for the duration, then back to its own mode.

    Sets the flag directly: modules from torch.export refuse `.eval()`.
    """
    modes = {m: m.training for m in model.modules()}
    try:
        for m in modes:
            m.training = False
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def run_module(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """Forward in eval mode under no_grad, restoring each module's mode: the tensors of the output,
    flattened (validation and calibration must not update BN statistics or draw dropout masks)."""
    with eval_mode(model), torch.no_grad():
        out = model(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    """Shapes on fake tensors (no compute, no memory); a real eval-mode run where fake mode fails."""
    with eval_mode(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        # (eval: must not update BN statistics or draw dropout masks; ShapeProp prints a traceback
        # for every failure, and a fake-mode failure on data-dependent code is expected)
        try:
            from torch._subclasses.fake_tensor import FakeTensorMode

            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
            return
        except Exception:  # noqa: BLE001 - e.g. .item() on a fake tensor: run for real instead
            pass
        try:
            ShapeProp(gm).propagate(*inputs)
        except Exception as exc:  # noqa: BLE001
            cause = exc.__cause__ or exc
            raise GraphpruneError(f"the module fails on the example inputs: {type(cause).__name__}: "
                                  f"{str(cause).strip()[:300]}") from None


def _batch_dynamic(inputs: tuple) -> tuple:
    """The batch axis of every tensor input may vary (Dim.AUTO: kept static if the model needs it).

    Without it the exported module guards the example's batch size, so the pruned module, the
    calibration runs and the recovery fits could only ever see that many samples at a time.
    """
    auto = torch.export.Dim.AUTO
    return tuple({0: auto} if isinstance(t, torch.Tensor) and t.ndim > 0 else None for t in inputs)


def _export(model: nn.Module, inputs: tuple, fx_error: str) -> torch.fx.GraphModule:
    """Capture with non-strict torch.export (in eval mode) on a copy of `model`.

    A copy, because export runs the Python forward on fake tensors and whatever the forward caches
    on itself (Ultralytics' Detect keeps its anchor grid) would be left fake on the model we return.
    The exported module keeps the parameters' qualified names, so the rewriter slices it by name.
    """
    shadow = copy.deepcopy(model)
    try:
        with eval_mode(shadow), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(shadow, inputs, strict=False, dynamic_shapes=_batch_dynamic(inputs))
        return ep.module()
    except Exception as exc:  # noqa: BLE001 - both capture errors go to the user in one line
        raise GraphpruneError(
            f"cannot capture {type(model).__name__}: torch.fx: {fx_error}; torch.export (non-strict): "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''} "
            "(wrap the untraceable part in a leaf module, or export to ONNX and prune that)"
        ) from None


def trace_module(model: nn.Module, example_inputs: Any) -> TracedModule:
    """Capture `model` (not copied: the GraphModule shares its submodules and parameters) into the IR.

    torch.fx first (the result can stay the user's own class); non-strict torch.export when fx cannot
    trace. `TracedModule.frontend` says which one was used.
    """
    inputs = _as_tuple(example_inputs)
    frontend, reason = FX, ""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to torch.export
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {msg}"
        gm = _export(model, inputs, reason)
        frontend = EXPORT
    _propagate_shapes(gm, inputs)
    low = _Lowering(model, gm)
    low.run()
    graph = Graph(low.nodes, low.shapes, low.constants, low.inputs, low.outputs, name=type(model).__name__,
                  frontend="torch")
    tensor_fx = {}
    for fx, v in low.env.items():
        if isinstance(v, str) and fx.op != "get_attr":
            tensor_fx.setdefault(v, fx)
    return TracedModule(model, gm, graph, low.origin, inputs, tensor_fx, frontend, reason)


def analyze_traced(traced: TracedModule, norm_channels: str = DEFAULT_NORM_CHANNELS) -> Analysis:
    if norm_channels == "prune" and traced.frontend != FX:
        # the masked reference re-traces the module with torch.fx to route LayerNorms through kept statistics
        raise GraphpruneError(f"norm_channels={norm_channels!r} needs a module torch.fx can trace; this one fell back "
                              f"to torch.export ({traced.fallback_reason})")
    analysis = analyze_graph(traced.graph, norm_channels)
    analysis.traced = traced  # the rewriter and gradient criteria need the module behind the IR
    return analysis


def analyze_module(model: nn.Module, example_inputs: Any) -> Analysis:
    """Dependency analysis of an nn.Module: the same groups/bindings/costs as the ONNX path."""
    return analyze_traced(trace_module(model, example_inputs))
