"""PyTorch frontend: trace an nn.Module with torch.fx and lower it into the same IR as ONNX.

Modules and functions become the op types the rule table (graphprune/analysis/rules.py) already
knows, so grouping logic exists once. Constants are numpy copies of the parameters and buffers,
keyed by their `named_parameters()` / `named_buffers()` names; shapes come from running the
example inputs through the traced graph (ShapeProp). `TracedModule.origin` maps every IR node
back to the fx node (and module) it came from, which is what the torch rewriter edits.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from graphprune.analysis.groups import Analysis, analyze_graph
from graphprune.errors import GraphpruneError
from graphprune.ir.graph import Graph, Node


@dataclass
class TracedModule:
    """A traced module, its IR, and where each IR node came from."""

    root: nn.Module
    gm: torch.fx.GraphModule
    graph: Graph
    origin: dict[str, torch.fx.Node] = field(default_factory=dict)  # IR node name -> fx node
    inputs: tuple = ()
    tensor_fx: dict[str, torch.fx.Node] = field(default_factory=dict)  # IR tensor -> fx node computing it


# ---------------------------------------------------------------------------------------------
# op tables: torch module types / function names -> IR op types
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
_UNARY_FUNCS: dict[str, str] = {
    "relu": "Relu", "relu6": "Clip", "silu": "Swish", "gelu": "Gelu", "hardswish": "HardSwish",
    "hardsigmoid": "HardSigmoid", "sigmoid": "Sigmoid", "tanh": "Tanh", "leaky_relu": "LeakyRelu",
    "elu": "Elu", "selu": "Selu", "mish": "Mish", "softplus": "Softplus", "hardtanh": "Clip", "clamp": "Clip",
    "clip": "Clip", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "rsqrt": "Reciprocal", "abs": "Abs", "neg": "Neg",
    "sin": "Sin", "cos": "Cos", "erf": "Erf", "reciprocal": "Reciprocal", "pow": "Pow",
    "add": "Add", "iadd": "Add", "sub": "Sub", "isub": "Sub", "rsub": "Sub", "mul": "Mul", "imul": "Mul",
    "truediv": "Div", "itruediv": "Div", "div": "Div", "maximum": "Max", "minimum": "Min",
    "stochastic_depth": "Identity", "dropout": "Dropout", "contiguous": "Identity", "clone": "Identity",
    "detach": "Identity", "to": "Identity", "float": "Identity", "type_as": "Identity",
    "adaptive_avg_pool1d": "AveragePool", "adaptive_avg_pool2d": "AveragePool", "adaptive_avg_pool3d": "AveragePool",
    "adaptive_max_pool2d": "MaxPool", "avg_pool2d": "AveragePool", "max_pool2d": "MaxPool", "avg_pool1d": "AveragePool",
    "max_pool1d": "MaxPool", "interpolate": "Resize", "upsample": "Resize", "pad": "Identity",
}
_ALIAS = {"contiguous", "clone", "detach", "to", "float", "type_as"}
_REDUCE = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin"}
_LAYOUT = {"flatten": "Flatten", "squeeze": "Squeeze", "unsqueeze": "Unsqueeze"}


def _fname(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


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
    """Walks the fx graph once, emitting IR nodes."""

    def __init__(self, root: nn.Module, gm: torch.fx.GraphModule) -> None:
        self.root, self.gm = root, gm
        self.nodes: list[Node] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.env: dict[torch.fx.Node, Any] = {}  # fx node -> tensor name, or list of names (tuple outputs)
        self.origin: dict[str, torch.fx.Node] = {}
        # canonical names: a tensor shared under two names is bound once, under its first name
        self.pname: dict[int, str] = {}
        for name, p in root.named_parameters():
            self.pname.setdefault(id(p), name)
        for name, b in root.named_buffers():
            self.pname.setdefault(id(b), name)
        for name, t in list(root.named_parameters()) + list(root.named_buffers()):
            if self.pname[id(t)] == name:
                self.constants[name] = t.detach().cpu().numpy().copy()
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

    def unknown(self, fx: torch.fx.Node, label: str, extra: list[str] = ()) -> None:
        ins = [t for t in (self.tensor_of(a) for a in _flat_args(fx)) if t]
        self.emit(fx, label, ins + [e for e in extra if e], domain="torch")

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
        p = lambda a: self.param(m, a)  # noqa: E731
        if isinstance(m, nn.modules.conv._ConvNd) and x:
            op = "ConvTranspose" if m.transposed else "Conv"
            self.emit(fx, op, [x, p("weight"), p("bias")], {"group": m.groups})
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)) and x \
                and m.track_running_stats:
            self.emit(fx, "BatchNormalization", [x, p("weight"), p("bias"), p("running_mean"), p("running_var")])
        elif isinstance(m, nn.Linear) and x:
            rank = len(self.shape_of(x))
            op, attrs = ("Gemm", {"transB": 1}) if rank == 2 else ("Linear", {})
            self.emit(fx, op, [x, p("weight"), p("bias")], attrs)
        elif isinstance(m, nn.LayerNorm) and x:
            self.emit(fx, "LayerNormalization", [x, p("weight"), p("bias")], {"axis": -len(m.normalized_shape)})
        elif isinstance(m, nn.GroupNorm) and x:
            self.emit(fx, "GroupNormalization", [x, p("weight"), p("bias")])
        elif type(m) in _ACT_MODULES and x:
            self.emit(fx, _ACT_MODULES[type(m)], [x] + ([p("weight")] if isinstance(m, nn.PReLU) else []))
        elif isinstance(m, _PASS_MODULES) and x:
            self.emit(fx, "Identity", [x])
        elif isinstance(m, nn.Flatten) and x:
            self.emit(fx, "Flatten", [x])
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax)) and x:
            dim = m.dim if m.dim is not None else -1
            self.emit(fx, "Softmax", [x], {"axis": dim})
        else:
            params = [self.pname[id(t)] for t in list(m.parameters()) + list(m.buffers())]
            self.unknown(fx, type(m).__name__, params)

    def call_function(self, fx: torch.fx.Node) -> None:
        name = _fname(fx)
        base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        args, kw = fx.args, fx.kwargs
        x = self.tensor_of(args[0]) if args else None
        if fx.target is operator.getitem:
            return self.getitem(fx)
        if base in _ALIAS and x is not None and len(_flat_args(fx)) == 1:
            self.env[fx] = x  # no-ops for channels: keep layout chains (e.g. channel shuffle) unbroken
            return
        if base in _UNARY_FUNCS and x is not None or (base in ("add", "mul", "sub", "truediv") and args):
            ins = [t for t in (self.tensor_of(a) for a in list(args) + list(kw.values())) if t]
            if not ins:
                return self.unknown(fx, name)
            op = _UNARY_FUNCS.get(base, "Add")
            if op in ("Identity", "Dropout", "AveragePool", "MaxPool", "Resize"):
                ins = ins[:1]
            return self.emit(fx, op, ins)
        if name in ("cat", "concat", "concatenate"):
            tensors = [self.tensor_of(a) for a in args[0]]
            if any(t is None for t in tensors):
                return self.unknown(fx, name)
            dim = _arg(args, kw, 1, "dim", 0)
            return self.emit(fx, "Concat", tensors, {"axis": int(dim)})
        if x is None:
            return self.unknown(fx, name)
        rank = len(self.shape_of(x))
        if name in ("split", "chunk", "tensor_split", "unbind") and name != "unbind":
            shapes = _meta_shapes(fx)
            dim = int(_arg(args, kw, 2, "dim", 0)) % rank
            sizes = [s[dim] for s in shapes]
            return self.emit(fx, "Split", [x], {"axis": dim, "split": sizes})
        if base in _REDUCE:
            dims = _arg(args, kw, 1, "dim", None)
            keep = bool(_arg(args, kw, 2, "keepdim", False))
            axes = list(range(rank)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
            return self.emit(fx, _REDUCE[base], [x], {"axes": axes, "keepdims": int(keep)})
        if name in ("softmax", "log_softmax"):
            return self.emit(fx, "Softmax", [x], {"axis": int(_arg(args, kw, 1, "dim", -1))})
        if name in ("view", "reshape"):
            shape_const = self.const(f"{fx.name}__shape", np.array(_meta_shapes(fx), dtype=np.int64))
            return self.emit(fx, "Reshape", [x, shape_const])
        if name in _LAYOUT:
            return self.emit(fx, _LAYOUT[name], [x])
        if name in ("permute", "transpose", "swapaxes"):
            if name == "permute":
                dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
                perm = [int(d) % rank for d in (dims or kw.get("dims"))]
            else:
                a, b = int(args[1]) % rank, int(args[2]) % rank
                perm = list(range(rank))
                perm[a], perm[b] = perm[b], perm[a]
            return self.emit(fx, "Transpose", [x], {"perm": perm})
        if name in ("matmul", "mm", "bmm") or fx.target is operator.matmul:
            b = self.tensor_of(args[1])
            return self.emit(fx, "MatMul", [x, b]) if b else self.unknown(fx, name)
        if name == "linear":
            w, b = self.tensor_of(args[1]), self.tensor_of(_arg(args, kw, 2, "bias", None))
            if w in self.constants and (b is None or b in self.constants):
                op, attrs = ("Gemm", {"transB": 1}) if rank == 2 else ("Linear", {})
                return self.emit(fx, op, [x, w, b or ""], attrs)
        if name == "layer_norm":
            ns = _arg(args, kw, 1, "normalized_shape", ())
            w, b = self.tensor_of(_arg(args, kw, 2, "weight", None)), self.tensor_of(_arg(args, kw, 3, "bias", None))
            return self.emit(fx, "LayerNormalization", [x, w or "", b or ""], {"axis": -len(ns)})
        if name == "group_norm":
            w, b = self.tensor_of(_arg(args, kw, 2, "weight", None)), self.tensor_of(_arg(args, kw, 3, "bias", None))
            return self.emit(fx, "GroupNormalization", [x, w or "", b or ""])
        return self.unknown(fx, name)

    def getitem(self, fx: torch.fx.Node) -> None:
        src, idx = fx.args
        v = self.env.get(src)
        if isinstance(v, list):
            self.env[fx] = v[idx]  # one output of a split/chunk or tuple-returning module
            return
        if not isinstance(v, str) or _meta_shapes(fx) is None:
            return
        shape = self.shape_of(v)
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, torch.fx.Node) or i is None or i is Ellipsis for i in idx) or len(idx) > len(shape):
            return self.unknown(fx, "getitem")
        ints = [k for k, i in enumerate(idx) if isinstance(i, int)]
        slices = [(k, i) for k, i in enumerate(idx) if isinstance(i, slice)]
        if any(isinstance(b, torch.fx.Node) for _, s in slices for b in (s.start, s.stop, s.step)):
            return self.unknown(fx, "getitem")
        if len(ints) == 1 and all(s == slice(None) for _, s in slices):
            k = ints[0]
            index = self.const(f"{fx.name}__index", np.array(idx[k] % shape[k], dtype=np.int64))
            return self.emit(fx, "Gather", [v, index], {"axis": k})
        if ints:
            return self.unknown(fx, "getitem")
        starts, ends, axes, steps = [], [], [], []
        for k, s in slices:
            lo, hi, st = s.indices(shape[k])
            if (lo, hi, st) != (0, shape[k], 1):
                starts.append(lo)
                ends.append(hi)
                axes.append(k)
                steps.append(st)
        self.emit(fx, "Slice", [v], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})


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


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple) -> None:
    """Shapes on fake tensors (no compute, no memory); a real eval-mode run where fake mode fails."""
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()  # shape propagation must not update BN statistics or draw dropout masks
        with torch.no_grad():
            try:
                from torch._subclasses.fake_tensor import FakeTensorMode

                ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
            except Exception:
                ShapeProp(gm).propagate(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def trace_module(model: nn.Module, example_inputs: Any) -> TracedModule:
    """Trace `model` (not copied: the GraphModule shares its submodules and parameters) into the IR."""
    inputs = _as_tuple(example_inputs)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise GraphpruneError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {str(exc)[:300]} "
            "(data-dependent control flow: wrap that part in a leaf module, or export to ONNX and prune that)"
        ) from None
    _propagate_shapes(gm, inputs)
    low = _Lowering(model, gm)
    low.run()
    graph = Graph(low.nodes, low.shapes, low.constants, low.inputs, low.outputs, name=type(model).__name__)
    tensor_fx = {}
    for fx, v in low.env.items():
        if isinstance(v, str):
            tensor_fx.setdefault(v, fx) if fx.op != "get_attr" else None
    return TracedModule(model, gm, graph, low.origin, inputs, tensor_fx)


def analyze_traced(traced: TracedModule) -> Analysis:
    analysis = analyze_graph(traced.graph)
    analysis.traced = traced  # the rewriter and gradient criteria need the module behind the IR
    return analysis


def analyze_module(model: nn.Module, example_inputs: Any) -> Analysis:
    """Dependency analysis of an nn.Module: the same groups/bindings/costs as the ONNX path."""
    return analyze_traced(trace_module(model, example_inputs))
