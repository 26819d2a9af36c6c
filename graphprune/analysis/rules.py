"""The channel rule table: one entry per op type, saying how channels flow through that op.

Each rule reads its inputs' channel spaces from the context, sets its outputs' spaces, merges
coupled channels, binds constant parameters to the channel axes that index them, and records
MACs. A rule that cannot prove a mapping raises Unresolved; the engine then freezes the op.
RULES is the single table both frontends use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable

import numpy as np

from graphprune.analysis.context import Ctx, Unresolved
from graphprune.analysis.spaces import Space, TooLarge, reshape_labels
from graphprune.ir.graph import Node

Rule = Callable[[Ctx, Node], None]
Cost = Callable[[Ctx, Node], float]


@dataclass
class NodeEdit:
    """Attribute and constant-operand changes a pruned op needs besides slicing its weights."""

    attrs: dict[str, Any] = field(default_factory=dict)
    drop_attrs: list[str] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)


Fix = Callable[[Ctx, Node, "dict[str, np.ndarray]"], NodeEdit | None]
# the masked reference of an op whose statistics exclude removed channels: (node, keep mask of its
# channel axis, input shape, element type) -> replacement nodes and the constants they add
Reference = Callable[[Node, np.ndarray, "tuple[int, ...]", np.dtype], "tuple[list[Node], dict[str, np.ndarray]]"]


@dataclass(frozen=True)
class OpRule:
    """How channels flow through one op type (analyze) and what else changes when pruned (fix)."""

    analyze: Rule
    fix: Fix | None = None
    # "first": only input 0 carries channels; any other non-constant input with channels (indices,
    # shapes, pads computed from activations) is frozen by the engine. "all": every input is data.
    operands: str = "first"
    # base multiply-accumulates of the unpruned op; the rule scales them by kept channels, and the
    # engine counts them unscaled when it freezes the op (one formula per op type, used both ways)
    cost: "Cost | None" = None
    # how the masked reference computes this op when a rule let removed channels into its statistics
    # (only under ctx.norm_channels == "prune"); None: consumer masking alone is the reference
    reference: "Reference | None" = None


def _ints(ctx: Ctx, node: Node, attr: str, index: int) -> list[int] | None:
    """An int-list operand that moved from attribute to input across opsets (axes, split, pads...)."""
    if attr in node.attrs and node.attrs[attr] is not None:
        v = node.attrs[attr]
        return [int(x) for x in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
    if len(node.inputs) > index and node.inputs[index]:
        return [int(x) for x in np.asarray(ctx.const(node.inputs[index])).ravel()]
    return None


def _channel(ctx: Ctx, tensor: str, axis: int) -> np.ndarray | None:
    """Ids along `axis`, storing the tensor in axis form if it was dense."""
    ids = ctx.ids(tensor, axis)
    if ids is not None and ctx.axis_of(tensor) != axis % ctx.rank(tensor):
        ctx.set_axis(tensor, axis, ids)
    return ids


def _data_space(ctx: Ctx, x: str, dense_reason: str) -> Space | None:
    """The channel space of an op's data input: None when it carries no channels; an op that
    needs a channel axis cannot follow a reshaped (dense) layout, so that is Unresolved."""
    sp = ctx.space(x)
    if sp is not None and sp.axis is None:
        raise Unresolved(dense_reason)
    return sp


def _first_axis(ctx: Ctx, node: Node) -> tuple[str, int] | None:
    for t in node.inputs:
        if t and not ctx.is_const(t) and ctx.axis_of(t) is not None:
            return t, ctx.axis_of(t)
    return None


# --------------------------------------------------------------------------------------------
# elementwise and pass-through ops
# --------------------------------------------------------------------------------------------
def elementwise(ctx: Ctx, node: Node) -> None:
    """Unary/binary/variadic ops with numpy broadcasting: aligned channels are coupled."""
    out = node.outputs[0]
    oshape = ctx.shape(out)
    orank = len(oshape)
    dense = [t for t in node.inputs if t and not ctx.is_const(t) and ctx.space(t) is not None and ctx.axis_of(t) is None]
    if dense:
        _elementwise_dense(ctx, node, dense)
        return
    axis = None
    for t in node.inputs:
        if not t or ctx.is_const(t):
            continue
        a = ctx.axis_of(t)
        if a is None:
            continue
        oa = a + orank - ctx.rank(t)
        if ctx.shape(t)[a] == oshape[oa] and oshape[oa] > 1:
            axis = oa
            break
    if axis is None:
        # no operand carries more than one channel along the output's axes: nothing to couple
        x = node.inputs[0]
        sp = ctx.space(x) if x and not ctx.is_const(x) else None
        if sp is not None and sp.axis is not None and ctx.rank(x) == orank:
            ctx.set_axis(out, sp.axis, sp.ids)
        return
    operands = []
    for t in node.inputs:
        if not t:
            continue
        ia = axis - (orank - len(ctx.shape(t)))
        if ia >= 0 and ctx.shape(t)[ia] != 1:  # size-1 (broadcast) operands carry no channels
            operands.append((t, ia))
    _merge_aligned(ctx, node, out, axis, operands)


def _elementwise_dense(ctx: Ctx, node: Node, dense: list[str]) -> None:
    """A reshaped (dense) layout through an op with single-value partners (attention's q * scale):
    every position keeps its label. Anything that would mix positions is Unresolved."""
    x, out = dense[0], node.outputs[0]
    if len(dense) > 1 or ctx.shape(out) != ctx.shape(x):
        raise Unresolved("elementwise op over a reshaped (non-channel) layout")
    for t in node.inputs:
        if t and t != x and prod(ctx.shape(t)) != 1:
            raise Unresolved("elementwise op over a reshaped (non-channel) layout with a non-scalar operand")
    ctx.set_dense(out, ctx.labels(x))


def _merge_aligned(ctx: Ctx, node: Node, out: str, axis: int, operands: list[tuple[str, int]]) -> None:
    """Operands whose channel axes line up position by position: one set of channels for all.

    Activations are coupled channel by channel; constants (biases, scales, class tokens) are
    bound to the output so they are sliced with it.
    """
    out_ids = None
    consts = []
    for t, ia in operands:
        if ctx.is_const(t):
            consts.append((t, ia))
            continue
        ids = _channel(ctx, t, ia)
        if ids is None:
            raise Unresolved(f"cannot map channels of '{t}'")
        if out_ids is None:
            out_ids = ids
        else:
            ctx.union(out_ids, ids)
    ctx.set_axis(out, axis, out_ids)
    for t, ia in consts:
        ctx.bind(t, ia, out, "coupled", node)


def passthrough(ctx: Ctx, node: Node) -> None:
    """Ops that keep the channel axis intact (pooling, resize, pad, identity, dropout)."""
    x = node.inputs[0]
    sp = _data_space(ctx, x, "channel layout op input is not in channel form")
    if sp is None:
        return
    out = node.outputs[0]
    if ctx.rank(out) != ctx.rank(x) or ctx.shape(out)[sp.axis] != ctx.shape(x)[sp.axis]:
        raise Unresolved("op changes the channel dimension")
    ctx.set_axis(out, sp.axis, sp.ids)


def pad(ctx: Ctx, node: Node) -> None:
    pads = _ints(ctx, node, "pads", 1)
    x = node.inputs[0]
    a = ctx.axis_of(x)
    if pads is not None and a is not None:
        r = ctx.rank(x)
        axes = _ints(ctx, node, "axes", 3) or list(range(r))
        axes = [ax % r for ax in axes]
        n = len(axes)
        if a in axes and (pads[axes.index(a)] != 0 or pads[axes.index(a) + n] != 0):
            raise Unresolved("Pad pads the channel axis")
    passthrough(ctx, node)


def along_axis(attr_default: int) -> Rule:
    """Softmax-like ops: fine unless they act along the channel axis."""

    def rule(ctx: Ctx, node: Node) -> None:
        x = node.inputs[0]
        a = ctx.axis_of(x)
        axis = int(node.attrs.get("axis", attr_default)) % ctx.rank(x)
        if a is not None and axis == a and ctx.shape(x)[a] > 1:
            raise Unresolved(f"{node.op_type} normalises across channels")
        passthrough(ctx, node)

    return rule


def normalization(ctx: Ctx, node: Node) -> None:
    """LayerNorm/GroupNorm: statistics over the channel axis tie every channel to every other.

    Removing a channel changes the mean/variance the others see, so the result would no longer
    equal consumer-side masking: by default such channels are frozen. With ctx.norm_channels ==
    "prune" a LayerNormalization over the channel axis alone is prunable under a stated semantics:
    masking a channel excludes it from the statistics (the masked reference computes them over the
    kept channels, see `reference_layer_norm`). Normalising other axes only is always fine.
    """
    x = node.inputs[0]
    sp = _data_space(ctx, x, "normalisation of a reshaped layout")
    if sp is None:
        return
    r = ctx.rank(x)
    if node.op_type == "GroupNormalization":
        normalized = set(range(1, r))
    else:
        normalized = set(range(int(node.attrs.get("axis", -1)) % r, r))
    if sp.axis in normalized and ctx.shape(x)[sp.axis] > 1:
        if ctx.norm_channels == "prune" and node.op_type == "LayerNormalization" and normalized == {sp.axis}:
            _stats_over_kept(ctx, node, sp)
            return
        raise Unresolved(f"{node.op_type} normalises across channels (pruning would change its statistics)")
    passthrough(ctx, node)
    for p in node.inputs[1:]:
        if p and ctx.is_const(p) and ctx.const(p).size > 1:
            raise Unresolved("per-element affine parameters over a non-channel axis")


# ONNX element type codes of the float types a LayerNormalization may run in besides float32
_ONNX_FLOAT_TYPES = {np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def _stats_over_kept(ctx: Ctx, node: Node, sp: Space) -> None:
    """A LayerNormalization over the channel axis only, its statistics taken over the kept channels:
    channels pass through, scale and bias are sliced with them, and the node is recorded so the
    masked reference computes its statistics over the kept channels too (RULES[op].reference)."""
    if any(o for o in node.outputs[1:]):
        raise Unresolved("LayerNormalization's mean/inv-std-dev outputs are used")
    out = node.outputs[0]
    ctx.set_axis(out, sp.axis, sp.ids)
    for p in node.inputs[1:3]:
        if not p:
            continue
        if not ctx.is_const(p):
            raise Unresolved("LayerNormalization scale/bias is not a constant")
        if ctx.const(p).ndim != 1:
            raise Unresolved("LayerNormalization scale/bias is not a vector over the channels")
        ctx.bind(p, 0, out, "coupled", node)
    ctx.norm_stats_nodes[node.name] = node.inputs[0]


def reference_layer_norm(node: Node, keep: np.ndarray, shape: tuple[int, ...],
                         dtype: np.dtype = np.dtype(np.float32)) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The masked reference of a LayerNormalization whose statistics exclude removed channels.

    Written with plain reductions over the full-width tensor (not by slicing, so it does not repeat
    the rewrite it checks): with m the keep mask (1 kept, 0 removed) and k = sum(m),
    mean = sum(x * m) / k, var = sum(((x - mean) * m)^2) / k, y = (x - mean) / sqrt(var + eps) * scale + bias.
    Removed positions of y are only read by consumers whose weights the reference zeroes. A model in
    another float type (`dtype`) is computed in float32 and cast back, as LayerNormalization does.
    Returns the replacement nodes (IR form, same output name) and the constants they add.
    """
    x, out = node.inputs[0], node.outputs[0]
    axis = len(shape) - 1
    eps = float(node.attrs.get("epsilon", 1e-5))
    p = f"{node.name}__gp_ref"
    cast = np.dtype(dtype) != np.float32
    if cast:  # computed in float (ONNX type 1), the original element type restored at the end
        pre = [Node(f"{p}_x32", "Cast", [x], [f"{p}_x32"], {"to": 1})]
        for k, name in ((1, "s32"), (2, "b32")):
            if len(node.inputs) > k and node.inputs[k]:
                pre.append(Node(f"{p}_{name}", "Cast", [node.inputs[k]], [f"{p}_{name}"], {"to": 1}))
        node = Node(node.name, node.op_type, [f"{p}_x32"] + [f"{p}_{n}" if len(node.inputs) > k and node.inputs[k] else ""
                                                            for k, n in ((1, "s32"), (2, "b32"))],
                    [f"{p}_y32"], node.attrs)
        nodes, consts = reference_layer_norm(node, keep, shape)
        back = Node(f"{p}_back", "Cast", [f"{p}_y32"], [out], {"to": _ONNX_FLOAT_TYPES[np.dtype(dtype)]})
        return pre + nodes + [back], consts
    x, out = node.inputs[0], node.outputs[0]
    m = np.asarray(keep, dtype=np.float32)
    consts = {f"{p}_m": m, f"{p}_k": np.array(1.0 / max(float(m.sum()), 1.0), dtype=np.float32),
              f"{p}_eps": np.array(eps, dtype=np.float32), f"{p}_axes": np.array([axis], dtype=np.int64)}
    nodes = [
        Node(f"{p}_xm", "Mul", [x, f"{p}_m"], [f"{p}_xm"]),
        Node(f"{p}_sum", "ReduceSum", [f"{p}_xm", f"{p}_axes"], [f"{p}_sum"], {"keepdims": 1}),
        Node(f"{p}_mean", "Mul", [f"{p}_sum", f"{p}_k"], [f"{p}_mean"]),
        Node(f"{p}_d", "Sub", [x, f"{p}_mean"], [f"{p}_d"]),
        Node(f"{p}_dm", "Mul", [f"{p}_d", f"{p}_m"], [f"{p}_dm"]),
        Node(f"{p}_sq", "Mul", [f"{p}_dm", f"{p}_dm"], [f"{p}_sq"]),
        Node(f"{p}_ssq", "ReduceSum", [f"{p}_sq", f"{p}_axes"], [f"{p}_ssq"], {"keepdims": 1}),
        Node(f"{p}_var", "Mul", [f"{p}_ssq", f"{p}_k"], [f"{p}_var"]),
        Node(f"{p}_ve", "Add", [f"{p}_var", f"{p}_eps"], [f"{p}_ve"]),
        Node(f"{p}_std", "Sqrt", [f"{p}_ve"], [f"{p}_std"]),
        Node(f"{p}_norm", "Div", [f"{p}_d", f"{p}_std"], [f"{p}_norm" if len(node.inputs) > 1 and node.inputs[1] else out]),
    ]
    last = nodes[-1].outputs[0]
    if len(node.inputs) > 1 and node.inputs[1]:
        has_bias = len(node.inputs) > 2 and bool(node.inputs[2])
        nodes.append(Node(f"{p}_scale", "Mul", [last, node.inputs[1]], [f"{p}_scaled" if has_bias else out]))
        if has_bias:
            nodes.append(Node(f"{p}_bias", "Add", [f"{p}_scaled", node.inputs[2]], [out]))
    return nodes, consts


def reduce(ctx: Ctx, node: Node) -> None:
    x = node.inputs[0]
    sp = _data_space(ctx, x, "reduction over a reshaped layout")
    if sp is None:
        return
    r = ctx.rank(x)
    axes = _ints(ctx, node, "axes", 1)
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            ctx.set_axis(node.outputs[0], sp.axis, sp.ids)
            return
        raise Unresolved("reduction over all axes")
    axes = sorted(a % r for a in axes)
    if sp.axis in axes:
        raise Unresolved("reduction across channels")
    keep = int(node.attrs.get("keepdims", 1))
    new_axis = sp.axis if keep else sp.axis - sum(1 for a in axes if a < sp.axis)
    ctx.set_axis(node.outputs[0], new_axis, sp.ids)


# --------------------------------------------------------------------------------------------
# weighted ops
# --------------------------------------------------------------------------------------------
# Operand slots of the weighted ops: (data input, weight, bias, per-output-channel quantisation params).
# Quantised forms keep their weights as integers; per-channel scales and zero points are sliced with them.
SLOTS: dict[str, tuple[int, int, int | None, tuple[int, ...]]] = {
    "Conv": (0, 1, 2, ()),
    "ConvTranspose": (0, 1, 2, ()),
    "ConvInteger": (0, 1, None, (3,)),
    "QLinearConv": (0, 3, 8, (4, 5)),
    "MatMul": (0, 1, None, ()),
    "MatMulInteger": (0, 1, None, (3,)),
    "QLinearMatMul": (0, 3, None, (4, 5)),
}


def _slot(node: Node, idx: int | None) -> str | None:
    return node.inputs[idx] if idx is not None and len(node.inputs) > idx and node.inputs[idx] else None


def _weighted_operands(ctx: Ctx, node: Node) -> tuple[str, str, str | None, np.ndarray]:
    """(input, weight, bias or None, weight value) of a conv-like op; the weight must be constant."""
    xi, wi, bi, _ = SLOTS[node.op_type]
    x, w, b = node.inputs[xi], node.inputs[wi], _slot(node, bi)
    if not ctx.is_const(w):
        raise Unresolved("weight is not a constant")
    return x, w, b, ctx.const(w)


def _bind_quant_params(ctx: Ctx, node: Node, out: str, axis: int) -> None:
    """Per-output-channel weight scales / zero points follow the filters; per-tensor ones stay."""
    for idx in SLOTS[node.op_type][3]:
        p = _slot(node, idx)
        if p and ctx.is_const(p) and ctx.const(p).size > 1:
            ctx.bind(p, axis, out, "out", node)


def _consume_input(ctx: Ctx, node: Node, x: str, in_ids: np.ndarray | None, w: str, w_axis: int, out: str,
                   divisor: int = 1) -> None:
    """Bind the weight's input axis to x's channels and count MACs over both sides; an input whose
    channels cannot be traced is frozen and only the output side scales the MACs."""
    base = macs_of(ctx, node)
    if in_ids is None:
        ctx.freeze_tensor(x, f"input channels of {node.name} cannot be traced")
        ctx.mac(node, base, out)
    else:
        ctx.bind(w, w_axis, x, "in", node, divisor=divisor)
        ctx.mac(node, base, x, out)


def conv(ctx: Ctx, node: Node) -> None:
    """Conv, ConvInteger and QLinearConv: filters along axis 0 of the weight, inputs along axis 1."""
    x, w, b, W = _weighted_operands(ctx, node)
    out = node.outputs[0]
    g = int(node.attrs.get("group", 1))
    cout, cin_g = W.shape[0], W.shape[1]
    in_ids = _channel(ctx, x, 1)
    out_ids = ctx.new(out, 1)
    ctx.bind(w, 0, out, "out", node)
    if b:
        ctx.bind(b, 0, out, "out", node)
    _bind_quant_params(ctx, node, out, 0)
    if g == 1 or in_ids is None:
        if g > 1:  # groups tie outputs to inputs that cannot be traced
            ctx.uf.freeze(out_ids, f"grouped conv {node.name} with untraceable input")
        _consume_input(ctx, node, x, in_ids, w, 1, out)
        return
    cin = len(in_ids)
    if cin != cin_g * g or cout % g:
        raise Unresolved("group count does not divide channels")
    cout_g = cout // g
    if cin_g == 1:
        # depthwise (channel multiplier cout_g): input channel k feeds outputs k*m .. k*m+m-1
        for j in range(cout_g):
            ctx.union(in_ids, out_ids[j::cout_g])
        ctx.mac(node, macs_of(ctx, node), out)
        return
    # grouped: prune the same in-group index in every group so the group count stays valid
    for k in range(1, g):
        ctx.union(in_ids[:cin_g], in_ids[k * cin_g:(k + 1) * cin_g])
        ctx.union(out_ids[:cout_g], out_ids[k * cout_g:(k + 1) * cout_g])
    _consume_input(ctx, node, x, in_ids, w, 1, out, divisor=g)


def conv_transpose(ctx: Ctx, node: Node) -> None:
    x, w, b, W = _weighted_operands(ctx, node)
    out = node.outputs[0]
    g = int(node.attrs.get("group", 1))
    if g != 1:
        raise Unresolved("grouped ConvTranspose")
    in_ids = _channel(ctx, x, 1)
    ctx.new(out, 1)
    ctx.bind(w, 1, out, "out", node)
    if b:
        ctx.bind(b, 0, out, "out", node)
    _consume_input(ctx, node, x, in_ids, w, 0, out)


def batchnorm(ctx: Ctx, node: Node) -> None:
    x = node.inputs[0]
    ids = _channel(ctx, x, 1)
    if ids is None:
        raise Unresolved("input is not in channel form")
    out = node.outputs[0]
    ctx.set_axis(out, 1, ids)
    for p in node.inputs[1:]:
        if p:
            ctx.bind(p, 0, out, "coupled", node)


def _dense_layer(ctx: Ctx, node: Node, x: str, w: str, bias: str | None, feature_axis: int,
                 k_axis: int, n_axis: int) -> None:
    """A weight matrix over one feature axis of x: input features along w's k_axis, outputs along n_axis.

    Shared by Gemm (rows of a 2-D input), MatMul (last axis) and torch's Linear (last axis).
    """
    out = node.outputs[0]
    in_ids = _channel(ctx, x, feature_axis)
    ctx.new(out, feature_axis)
    ctx.bind(w, n_axis, out, "out", node)
    if bias:
        ctx.bind(bias, ctx.const(bias).ndim - 1, out, "out", node)
    if node.op_type in SLOTS:
        _bind_quant_params(ctx, node, out, -1)
    _consume_input(ctx, node, x, in_ids, w, k_axis, out)


def gemm(ctx: Ctx, node: Node) -> None:
    a, bw = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if int(node.attrs.get("transA", 0)):
        raise Unresolved("transposed activation operand")
    if not ctx.is_const(bw):
        raise Unresolved("weight is not a constant")
    if c and not ctx.is_const(c):
        raise Unresolved("non-constant bias")
    B = ctx.const(bw)
    k_axis, n_axis = (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    if c is not None:
        C = ctx.const(c)
        if not (C.ndim >= 1 and C.shape[-1] == B.shape[n_axis] and C.shape[-1] > 1):
            c = None  # a scalar or broadcast bias does not follow the output channels
    _dense_layer(ctx, node, a, bw, c, 1, k_axis, n_axis)


def matmul(ctx: Ctx, node: Node) -> None:
    """MatMul, MatMulInteger and QLinearMatMul with a constant 2-D right operand."""
    a, bw = node.inputs[SLOTS[node.op_type][0]], node.inputs[SLOTS[node.op_type][1]]
    if node.op_type == "MatMul" and not ctx.is_const(bw) and not ctx.is_const(a):
        _head_product(ctx, node)
        return
    if not ctx.is_const(bw) or ctx.const(bw).ndim != 2:
        raise Unresolved("product of two activations (e.g. attention) or batched weight")
    if ctx.is_const(a):
        raise Unresolved("constant left operand")
    _dense_layer(ctx, node, a, bw, None, -1, 0, 1)


def _head_product(ctx: Ctx, node: Node) -> None:
    """A product of two activations (attention's q @ k^T and scores @ v) prunes whole heads.

    Channels may live on one batch axis (the heads) and, within a head, anywhere along the
    contracted axis (q/k/v dims of that head). Output[.., h, ..] = A[.., h, ..] @ B[.., h, ..], so
    deleting head h from both operands and the output leaves every other head's result unchanged;
    deleting part of a head would change q.k, which no consumer-side mask can express. So every
    label inside head h (of both operands) becomes one class, and the output carries the heads
    along that batch axis (v's dims of a head, on the output's last axis, belong to that head's class).
    """
    a, b = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    base = macs_of(ctx, node)
    la, lb = ctx.labels(a), ctx.labels(b)
    if la is None and lb is None:
        ctx.mac(node, base)
        return
    sa, sb, so = ctx.shape(a), ctx.shape(b), ctx.shape(out)
    r = len(so)
    if la is None or lb is None or not (len(sa) == len(sb) == r >= 3):
        raise Unresolved("product of two activations where only one carries channels, or without batch axes")
    heads = [ax for ax in range(r - 2) if la.shape[ax] > 1 or lb.shape[ax] > 1]
    if len(heads) != 1:
        raise Unresolved("product of two activations without a single head axis")
    h = heads[0]
    if not (la.shape[h] == lb.shape[h] == sa[h] == sb[h] == so[h]):
        raise Unresolved("product of two activations whose head axes differ")
    if ctx.graph.frontend != "onnx":
        # the PyTorch rewrite has no proven edit for every head-split spelling yet: kept whole there
        raise Unresolved("product of two activations (heads prune in the ONNX path only)")
    ids = np.empty(so[h], dtype=np.int64)
    for i in range(so[h]):
        members = np.unique(np.concatenate([np.take(la, i, axis=h).ravel(), np.take(lb, i, axis=h).ravel()]))
        ctx.uf.union_arrays(np.full(len(members), members[0]), members)
        ids[i] = members[0]
    ctx.head_ids.extend(ids.tolist())
    ctx.set_axis(out, h, ids)
    ctx.mac(node, base, out)


def linear(ctx: Ctx, node: Node) -> None:
    """torch Linear over the last axis of an N-D input: weight [out, in], bias [out] (PyTorch frontend)."""
    a, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
    if not ctx.is_const(w) or ctx.const(w).ndim != 2:
        raise Unresolved("weight is not a constant matrix")
    _dense_layer(ctx, node, a, w, b, -1, 1, 0)


# --------------------------------------------------------------------------------------------
# concatenation, splitting, slicing, gathering
# --------------------------------------------------------------------------------------------
def concat(ctx: Ctx, node: Node) -> None:
    out = node.outputs[0]
    r = ctx.rank(out)
    cat = int(node.attrs.get("axis", 0)) % r
    found = _first_axis(ctx, node)
    if found is None:
        if any(ctx.space(t) is not None for t in node.inputs if t and not ctx.is_const(t)):
            raise Unresolved("concat of reshaped layouts")
        return
    ch = found[1] + r - ctx.rank(found[0])
    if cat == ch:
        parts = []
        for t in node.inputs:
            ids = None if ctx.is_const(t) else _channel(ctx, t, ch)
            if ids is None:
                reason = f"constant or untraceable input of {node.name}"
                ctx.freeze_tensor(t, reason)  # its own channels cannot follow it through the concat
                ids = ctx.uf.new(ctx.shape(t)[ch])
                ctx.uf.freeze(ids, reason)
            parts.append(ids)
        ctx.set_axis(out, ch, np.concatenate(parts))
        return
    _merge_aligned(ctx, node, out, ch, [(t, ch) for t in node.inputs if t])


def _take_labels(labels: np.ndarray, axis: int, index: Any) -> np.ndarray:
    """Labels of a part of a dense layout along `axis` (a broadcast axis repeats its one label)."""
    if labels.shape[axis] == 1:
        return labels if not isinstance(index, int) else np.take(labels, 0, axis=axis)
    return np.take(labels, index, axis=axis)


def split(ctx: Ctx, node: Node) -> None:
    x = node.inputs[0]
    sp = ctx.space(x)
    if sp is None:
        return
    r = ctx.rank(x)
    ax = int(node.attrs.get("axis", 0)) % r
    if sp.axis is None:  # q/k/v of a reshaped attention layout
        labels, offset = ctx.labels(x), 0
        for out in node.outputs:
            size = ctx.shape(out)[ax]
            ctx.set_dense(out, _take_labels(labels, ax, np.arange(offset, offset + size)))
            offset += size
        return
    offset = 0
    for out in node.outputs:
        if ctx.rank(out) != r:
            raise Unresolved("split output rank differs")
        size = ctx.shape(out)[ax]
        if ax == sp.axis:
            ctx.set_axis(out, ax, sp.ids[offset:offset + size])
        else:
            ctx.set_axis(out, sp.axis, sp.ids)
        offset += size


def slice_(ctx: Ctx, node: Node) -> None:
    x = node.inputs[0]
    sp = ctx.space(x)
    if sp is None:
        return
    r = ctx.rank(x)
    starts = _ints(ctx, node, "starts", 1)
    ends = _ints(ctx, node, "ends", 2)
    axes = _ints(ctx, node, "axes", 3) or list(range(len(starts or [])))
    steps = _ints(ctx, node, "steps", 4) or [1] * len(axes)
    if starts is None or ends is None:
        raise Unresolved("slice bounds are not constant")
    out = node.outputs[0]
    if sp.axis is None:  # q/k/v of a reshaped attention layout (Paddle2ONNX spells them as slices)
        labels, shape = ctx.labels(x), ctx.shape(x)
        for s, e, a, st in zip(starts, ends, axes, steps):
            if labels.shape[a % r] > 1:
                if st != 1:
                    raise Unresolved("strided slice of a reshaped layout")
                lo, hi, _ = slice(s, e, 1).indices(shape[a % r])
                labels = _take_labels(labels, a % r, np.arange(lo, hi))
        ctx.set_dense(out, labels)
        return
    ids = sp.ids
    for s, e, a, st in zip(starts, ends, axes, steps):
        if a % r == sp.axis:
            if st != 1:
                raise Unresolved("strided slice across channels")
            ids = ids[slice(*slice(s, e, st).indices(len(ids)))]
    ctx.set_axis(out, sp.axis, ids)


def gather(ctx: Ctx, node: Node) -> None:
    x, idx = node.inputs[0], node.inputs[1]
    sp = ctx.space(x)
    if sp is None:
        return
    r = ctx.rank(x)
    ax = int(node.attrs.get("axis", 0)) % r
    if sp.axis is None:
        # one constant index out of a reshaped layout (torch's qkv[0]): the labels of that part
        if not ctx.is_const(idx) or np.asarray(ctx.const(idx)).ndim != 0:
            raise Unresolved("gather from a reshaped layout")
        i = int(np.asarray(ctx.const(idx))) % ctx.shape(x)[ax]
        ctx.set_dense(node.outputs[0], _take_labels(ctx.labels(x), ax, i))
        return
    if ax == sp.axis:
        raise Unresolved("gather across channels")
    idx_rank = len(ctx.shape(idx))
    new_axis = sp.axis if sp.axis < ax else sp.axis - 1 + idx_rank
    ctx.set_axis(node.outputs[0], new_axis, sp.ids)


# --------------------------------------------------------------------------------------------
# layout ops: pushed through as dense labels, resolved back to a channel axis when possible
# --------------------------------------------------------------------------------------------
def layout(ctx: Ctx, node: Node) -> None:
    x = node.inputs[0]
    labels = ctx.labels(x)
    if labels is None:
        return
    out = node.outputs[0]
    oshape = ctx.shape(out)
    if node.op_type == "Reshape" and not ctx.is_const(node.inputs[1]):
        raise Unresolved("reshape target is computed at run time")
    prefer: tuple[int, ...] = (1, -1)
    if node.op_type == "Transpose":
        perm = node.attrs.get("perm") or list(reversed(range(labels.ndim)))
        moved = np.transpose(labels, perm)
        if ctx.axis_of(x) is not None:  # an axis-form input: its channel axis moves to perm.index(axis)
            prefer = (list(perm).index(ctx.axis_of(x)), 1, -1)
    else:
        ishape = ctx.shape(x)
        if prod(ishape) != prod(oshape):
            raise Unresolved("element count changes")
        try:
            moved = reshape_labels(labels, ishape, oshape)
        except TooLarge as exc:
            raise Unresolved(f"layout too large to track channel by channel ({exc})") from None
    ctx.set_dense(out, moved, prefer)
    start, nodes = ctx.chains.get(x, (x, []))
    nodes = nodes + [node.name]
    if ctx.axis_of(out) is None:
        if ctx.axis_of(start) is not None and len(ctx.graph.consumers(out)) == 1 \
                and out not in ctx.graph.outputs:
            ctx.chains[out] = (start, nodes)  # may still net out to a permutation further on
        else:
            # frozen at the end unless a later rule (attention heads) ties each slice along one
            # axis into one class; see engine.resolve_dense
            ctx.dense_reasons[out] = f"channels spread over several axes by {node.op_type} '{node.name}'"
        return
    if x not in ctx.chains:
        return
    s_sp, e_sp = ctx.space(start), ctx.space(out)
    if (s_sp.axis == e_sp.axis and ctx.shape(start) == ctx.shape(out)
            and len(np.unique(s_sp.ids)) == len(s_sp.ids)
            and np.array_equal(np.sort(s_sp.ids), np.sort(e_sp.ids))):
        ctx.permutes[out] = (start, nodes)
    else:
        reason = f"layout chain ending at {node.op_type} '{node.name}' is not a channel permutation"
        ctx.freeze_tensor(out, reason)
        ctx.freeze_tensor(start, reason)


def shape_reader(ctx: Ctx, node: Node) -> None:
    """Shape/Size read channel counts as data: pruning would silently change them.

    Unless the frontend folded this read into constant bounds that the rewriter rewrites, or every
    use of the Shape picks dims other than the channel axis (the batch size for an initial state).
    """
    if node.name in ctx.graph.folded_nodes:
        return
    x = node.inputs[0]
    axis = ctx.axis_of(x)
    if node.op_type == "Shape" and axis is not None and _reads_other_dims(ctx, node, axis):
        return
    ctx.freeze_tensor(x, f"channel count read by {node.op_type} '{node.name}'")


def _reads_other_dims(ctx: Ctx, node: Node, axis: int) -> bool:
    """True if each consumer of Shape(x) only gathers constant indices other than x's channel axis."""
    rank = ctx.rank(node.inputs[0])
    start = int(node.attrs.get("start", 0)) % (rank + 1) if node.attrs.get("start", 0) < 0 else int(node.attrs.get("start", 0))
    users = ctx.graph.consumers(node.outputs[0])
    if not users or node.outputs[0] in ctx.graph.outputs:
        return False
    for user in users:
        if user.op_type != "Gather" or user.inputs[0] != node.outputs[0] or not ctx.is_const(user.inputs[1]):
            return False
        picked = {(int(i) % rank) if start == 0 else int(i) + start for i in np.ravel(ctx.const(user.inputs[1]))}
        if axis in picked:
            return False
    return True


def no_channels(ctx: Ctx, node: Node) -> None:
    """Ops whose outputs carry no channels (e.g. constant generators)."""


def multihead_attention(ctx: Ctx, node: Node) -> None:
    """torch's nn.MultiheadAttention (PyTorch frontend), kept whole: its width is split into heads
    inside one fused module, so every channel it touches is frozen; its MACs still count.

    Inputs: query, key, value, then the module's parameters; attrs embed_dim, kdim, vdim, batch_first.
    MACs: the q/k/v and output projections plus q @ k^T and attn @ v over all heads.
    """
    q, k = node.inputs[0], node.inputs[1]
    e = int(node.attrs["embed_dim"])
    kd, vd = int(node.attrs.get("kdim") or e), int(node.attrs.get("vdim") or e)
    qs, ks = ctx.shape(q), ctx.shape(k)
    if len(qs) == 2:  # unbatched (L, E)
        n, length, s = 1, qs[0], ks[0]
    elif int(node.attrs.get("batch_first", 0)):
        n, length, s = qs[0], qs[1], ks[1]
    else:
        length, n, s = qs[0], qs[1], ks[0]
    reason = f"nn.MultiheadAttention '{node.name}' is kept whole"
    ctx.frozen_nodes[node.name] = reason
    for t in node.inputs[:3]:
        ctx.freeze_tensor(t, reason)
    for t in node.outputs:
        if t and ctx.graph.shape(t):
            ctx.new(t, -1, frozen=reason)
    ctx.mac(node, n * (2 * length * e * e + s * (kd + vd) * e + 2 * length * s * e))


# --------------------------------------------------------------------------------------------
# recurrent layers, quantisation, control flow
# --------------------------------------------------------------------------------------------
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _rnn_macs(ctx: Ctx, node: Node) -> tuple[float, float]:
    """(input-projection, recurrent) MACs of LSTM/GRU/RNN: per direction, gate and time step.

    X is [seq, batch, input] (layout 0) or [batch, seq, input]; W is [dirs, gates*hidden, input]
    and R [dirs, gates*hidden, hidden], so each step costs gates*hidden*(input + hidden) per sample.
    """
    xs = ctx.shape(node.inputs[0])
    ws, rs = ctx.shape(node.inputs[1]), ctx.shape(node.inputs[2])
    if len(xs) != 3 or len(ws) != 3 or xs[-1] != ws[2]:
        raise Unresolved(f"{node.op_type} input shape {xs} does not match its weight {ws}")
    steps = xs[0] * xs[1]  # seq * batch, whichever the layout
    return float(steps * ws[0] * ws[1] * ws[2]), float(steps * rs[0] * rs[1] * rs[2])


def recurrent(ctx: Ctx, node: Node) -> None:
    """LSTM/GRU/RNN: the input width is a consumer (W's input columns); the hidden size stays."""
    x, w = node.inputs[0], node.inputs[1]
    if not ctx.is_const(w):
        raise Unresolved("weight is not a constant")
    in_macs, rec_macs = _rnn_macs(ctx, node)
    in_ids = _channel(ctx, x, -1)
    for t in node.outputs:
        if t and ctx.graph.shape(t):
            ctx.new(t, -1, frozen=f"hidden size of {node.op_type} '{node.name}' (kept whole)")
    if in_ids is None:
        ctx.freeze_tensor(x, f"input channels of {node.name} cannot be traced")
        ctx.mac(node, in_macs)
    else:
        ctx.bind(w, 2, x, "in", node)
        ctx.mac(node, in_macs, x)
    ctx.mac(node, rec_macs)


def quant_linear(ctx: Ctx, node: Node) -> None:
    """QuantizeLinear/DequantizeLinear: elementwise; a per-channel scale along the channel axis is
    bound to it. The dequantisation of a constant weight is folded by the frontend (its output is a
    constant whose slicing is forwarded to the integer weight, scale and zero point)."""
    x = node.inputs[0]
    if ctx.is_const(x) or ctx.space(x) is None:
        return
    scale = ctx.const(node.inputs[1])
    if scale.size <= 1:
        sp = _data_space(ctx, x, "quantisation of a reshaped layout")
        ctx.set_axis(node.outputs[0], sp.axis, sp.ids)
        return
    axis = int(node.attrs.get("axis", 1)) % ctx.rank(x)
    ids = _channel(ctx, x, axis)
    if ids is None:
        raise Unresolved("per-channel quantisation along an axis without channels")
    out = node.outputs[0]
    ctx.set_axis(out, axis, ids)
    for p in node.inputs[1:3]:
        if p and ctx.const(p).size > 1:
            ctx.bind(p, 0, out, "coupled", node)


def einsum(ctx: Ctx, node: Node) -> None:
    raise Unresolved("channels through Einsum are not traced")


def _outer_reads(body: Any) -> set[str]:
    """Tensors a body (and the bodies inside it) reads from enclosing scopes."""
    own = set(body.inputs) | set(body.constants) | {o for n in body.nodes for o in n.outputs}
    reads = {t for n in body.nodes for t in n.inputs if t}
    for n in body.nodes:
        for v in n.attrs.values():
            if hasattr(v, "nodes"):
                reads |= _outer_reads(v)
    return reads - own


def control_flow(ctx: Ctx, node: Node) -> None:
    """If/Loop/Scan: channels are not traced through bodies, so every tensor a body reads from the
    enclosing graph keeps its channels (a pruned one would no longer fit the body's weights)."""
    for v in node.attrs.values():
        if hasattr(v, "nodes"):
            for t in sorted(_outer_reads(v)):
                ctx.freeze_tensor(t, f"read inside the {node.op_type} '{node.name}' subgraph")
    raise Unresolved(f"channels through {node.op_type} subgraphs are not traced")


# -- cost formulas: base MACs of the unpruned op, one per op type --------------------------------
def _conv_macs(ctx: Ctx, node: Node) -> float:
    """Conv iterates over output positions: N * Cout * Cin/g * prod(kernel) * prod(output spatial)."""
    w = ctx.shape(node.inputs[SLOTS[node.op_type][1]])
    out = ctx.shape(node.outputs[0])
    return float(out[0] * w[0] * w[1] * prod(w[2:]) * prod(out[2:]))


def _conv_transpose_macs(ctx: Ctx, node: Node) -> float:
    """ConvTranspose iterates over input positions: N * Cin * Cout/g * prod(kernel) * prod(input spatial)."""
    w = ctx.shape(node.inputs[1])
    x = ctx.shape(node.inputs[0])
    return float(x[0] * w[0] * w[1] * prod(w[2:]) * prod(x[2:]))


def _matmul_macs(ctx: Ctx, node: Node) -> float:
    """Every output element is a K-long dot product (weights or two activations, as in attention)."""
    xi, wi = SLOTS[node.op_type][:2]
    a, b = ctx.shape(node.inputs[xi]), ctx.shape(node.inputs[wi])
    k = a[-1] if a else 1
    out = ctx.shape(node.outputs[0])
    if len(a) == 1 and len(b) == 1:
        return float(k)
    return float(prod(out) * k)


def _gemm_macs(ctx: Ctx, node: Node) -> float:
    a = ctx.shape(node.inputs[0])
    k = a[0] if int(node.attrs.get("transA", 0)) else a[-1]
    return float(prod(ctx.shape(node.outputs[0])) * k)


def _linear_macs(ctx: Ctx, node: Node) -> float:
    x, w = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
    return float(prod(x[:-1]) * w[0] * w[1])


def _einsum_macs(ctx: Ctx, node: Node) -> float:
    """A contraction of n operands multiplies n-1 times per point of the joint index space."""
    eq = str(node.attrs.get("equation", "")).replace(" ", "")
    lhs = eq.split("->")[0].split(",")
    ops = [t for t in node.inputs if t]
    if len(lhs) != len(ops) or len(ops) < 2 or any("..." in term for term in lhs):
        if len(ops) == 1:
            return 0.0
        raise Unresolved(f"Einsum equation '{eq}' with broadcast dims")
    sizes: dict[str, int] = {}
    for term, t in zip(lhs, ops):
        for letter, d in zip(term, ctx.shape(t)):
            sizes[letter] = max(sizes.get(letter, 1), d)
    return float((len(ops) - 1) * prod(sizes.values()))


def _rnn_total(ctx: Ctx, node: Node) -> float:
    return sum(_rnn_macs(ctx, node))


def _subgraph_macs(ctx: Ctx, graph: Any, chooser: str | None = None) -> float:
    if ctx.body_macs is None:
        raise Unresolved("no subgraph cost walker (the context was not made by the analysis engine)")
    return ctx.body_macs(graph, ctx.graph, chooser)


def _if_macs(ctx: Ctx, node: Node) -> float:
    """If: the larger branch, or the one --branch picks (then/else)."""
    branches = {"then": node.attrs.get("then_branch"), "else": node.attrs.get("else_branch")}
    if any(b is None or not hasattr(b, "nodes") for b in branches.values()):
        raise Unresolved("If branches were not lowered")
    from graphprune.frontends.fold import shape_value

    cond = shape_value(ctx.graph, node.inputs[0])
    choice = ctx.graph.branch
    if cond is not None and np.asarray(cond).size == 1:  # decided by static shapes: the branch it takes
        choice = "then" if bool(np.asarray(cond).ravel()[0]) else "else"
    costs = {k: _subgraph_macs(ctx, b) for k, b in branches.items()}
    return costs[choice] if choice in costs else max(costs.values())


def _loop_macs(ctx: Ctx, node: Node) -> float:
    """Loop: body MACs times the trip count, which must be a constant (else the cost is unknown)."""
    body = node.attrs.get("body")
    trip = node.inputs[0] if node.inputs else ""
    if not trip or not ctx.is_const(trip):
        raise Unresolved("Loop trip count is not a constant")
    return float(int(np.asarray(ctx.const(trip)).ravel()[0])) * _subgraph_macs(ctx, body)


def _scan_macs(ctx: Ctx, node: Node) -> float:
    """Scan: body MACs once per slice of the first scan input along its scan axis."""
    body = node.attrs.get("body")
    n_scan = int(node.attrs.get("num_scan_inputs", 1))
    n_state = len(node.inputs) - n_scan
    axes = node.attrs.get("scan_input_axes") or [0] * n_scan
    first = ctx.shape(node.inputs[n_state])
    return float(first[int(axes[0]) % len(first)]) * _subgraph_macs(ctx, body)


# ops without a channel rule that still do no multiply-accumulates (data movement, indexing, compares)
NO_MAC_OPS = frozenset({
    "Expand", "Tile", "ScatterND", "ScatterElements", "GatherND", "GatherElements", "NonZero", "TopK",
    "ArgMax", "ArgMin", "CumSum", "Trilu", "OneHot", "DepthToSpace", "SpaceToDepth", "NonMaxSuppression",
    "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Compress",
    "ReverseSequence", "Unique", "LessOrEqual", "GreaterOrEqual", "SequenceAt", "SequenceConstruct",
    "SequenceEmpty", "SequenceInsert", "SequenceLength", "SplitToSequence", "ConcatFromSequence",
    "DynamicQuantizeLinear", "Constant", "CastLike", "Bernoulli", "Shrink", "Optional", "OptionalGetElement",
    "OptionalHasElement",
})

COSTS: dict[str, Cost] = {
    "Conv": _conv_macs,
    "ConvInteger": _conv_macs,
    "QLinearConv": _conv_macs,
    "ConvTranspose": _conv_transpose_macs,
    "MatMul": _matmul_macs,
    "MatMulInteger": _matmul_macs,
    "QLinearMatMul": _matmul_macs,
    "Gemm": _gemm_macs,
    "Linear": _linear_macs,
    "Einsum": _einsum_macs,
    "LSTM": _rnn_total,
    "GRU": _rnn_total,
    "RNN": _rnn_total,
    "If": _if_macs,
    "Loop": _loop_macs,
    "Scan": _scan_macs,
}


def macs_of(ctx: Ctx, node: Node) -> float:
    """Base MACs of `node` by the table's formula for its op type (0 for ops that do no MACs)."""
    fn = COSTS.get(node.op_type)
    return fn(ctx, node) if fn is not None else 0.0


# --------------------------------------------------------------------------------------------
# fixes: attribute / shape-operand updates after slicing (frontend-neutral; applied by rewriters)
# --------------------------------------------------------------------------------------------
def _kept(masks: dict[str, np.ndarray], tensor: str) -> int:
    return int(masks[tensor].sum())


def fix_conv(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    g = int(node.attrs.get("group", 1))
    if g > 1 and ctx.const(node.inputs[SLOTS[node.op_type][1]]).shape[1] == 1 and node.inputs[0] in masks \
            and ctx.axis_of(node.inputs[0]) == 1:
        return NodeEdit(attrs={"group": _kept(masks, node.inputs[0])})
    return None


def _reshaped(target: np.ndarray, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape Reshape produces for `target` (0 copies, -1 infers), or None if invalid."""
    dims = [in_shape[i] if d == 0 and i < len(in_shape) else int(d) for i, d in enumerate(target)]
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        rest = prod(d for d in dims if d != -1)
        if rest == 0 or prod(in_shape) % rest:
            return None
        dims[dims.index(-1)] = prod(in_shape) // rest
    return tuple(dims)


def _pruned_shape(ctx: Ctx, tensor: str, masks: dict[str, np.ndarray]) -> tuple[int, ...]:
    shape = list(ctx.shape(tensor))
    if tensor in masks and ctx.axis_of(tensor) is not None:
        shape[ctx.axis_of(tensor)] = _kept(masks, tensor)
    return tuple(shape)


def fix_reshape(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    out = node.outputs[0]
    if out not in masks or node.op_type != "Reshape":
        return None
    axis = ctx.axis_of(out)
    target = node.inputs[1]
    if ctx.graph.producer(target) is not None:
        # a target computed at run time from Shape reads (folded for analysis): keep the computation
        # (dynamic dims stay dynamic) if, given the pruned shapes, it yields the pruned output shape
        from graphprune.frontends.fold import shape_value

        pruned = {t: _pruned_shape(ctx, t, masks) for t in masks}
        again = shape_value(ctx.graph, target, shapes=pruned, recompute=True)
        if again is not None and _reshaped(again, pruned.get(node.inputs[0], ctx.shape(node.inputs[0]))) \
                == _pruned_shape(ctx, out, masks):
            return None
    shape = np.array(ctx.const(target), dtype=np.int64).copy()
    if shape[axis] <= 0 or shape[axis] == _kept(masks, out):
        return None
    shape[axis] = _kept(masks, out)
    if ctx.graph.producer(target) is not None and not int(node.attrs.get("allowzero", 0)):
        # the constant replaces a run-time target: dims copied from the input (a batch, a dynamic
        # width) are written as 0 ("copy"), so they stay dynamic
        in_shape = ctx.shape(node.inputs[0])
        for i in range(min(len(shape), len(in_shape))):
            if i != axis and shape[i] == in_shape[i] and i != ctx.axis_of(node.inputs[0]):
                shape[i] = 0
    return NodeEdit(inputs={1: shape})


def fix_split(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    x = node.inputs[0]
    if x not in masks:
        return None
    axis = int(node.attrs.get("axis", 0)) % ctx.rank(x)
    if axis != ctx.axis_of(x):
        return None
    sizes = np.array([_kept(masks, o) for o in node.outputs], dtype=np.int64)
    old = np.array([ctx.shape(o)[axis] for o in node.outputs], dtype=np.int64)
    if np.array_equal(sizes, old):
        return None
    if "split" in node.attrs:
        return NodeEdit(attrs={"split": sizes.tolist()})
    return NodeEdit(inputs={1: sizes}, drop_attrs=["num_outputs"])


def _bounds_drift(ctx: Ctx, node: Node, masks: dict[str, np.ndarray], starts: list[int], ends: list[int]) -> bool:
    """Whether Slice bounds computed at run time (e.g. chunk(): Shape -> Div -> Mul) would no longer be
    `starts`/`ends` once the input is pruned: a slice that keeps all its channels can still need
    constant bounds because the shape they are computed from shrank."""
    from graphprune.frontends.fold import shape_value

    shapes = {t: _pruned_shape(ctx, t, masks) for t in masks}
    for index, want in ((1, starts), (2, ends)):
        t = node.inputs[index] if len(node.inputs) > index else ""
        if not t or ctx.graph.producer(t) is None:
            continue
        again = shape_value(ctx.graph, t, shapes=shapes, recompute=True)
        if again is None or [int(v) for v in np.asarray(again).ravel()] != list(want):
            return True
    return False


def fix_slice(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    x = node.inputs[0]
    if x not in masks:
        return None
    r = ctx.rank(x)
    starts = _ints(ctx, node, "starts", 1)
    ends = _ints(ctx, node, "ends", 2)
    axes = _ints(ctx, node, "axes", 3) or list(range(len(starts)))
    mask = masks[x]
    new_starts, new_ends, changed = list(starts), list(ends), False
    for i, (s, e, a) in enumerate(zip(starts, ends, axes)):
        if a % r != ctx.axis_of(x):
            continue
        lo, hi, _ = slice(s, e, 1).indices(len(mask))
        new_starts[i] = int(mask[:lo].sum())
        new_ends[i] = new_starts[i] + int(mask[lo:hi].sum())
        changed = changed or (new_starts[i], new_ends[i]) != (lo, hi)
    if not changed and not _bounds_drift(ctx, node, masks, new_starts, new_ends):
        return None
    if "starts" in node.attrs:
        return NodeEdit(attrs={"starts": new_starts, "ends": new_ends})
    return NodeEdit(inputs={1: np.array(new_starts, dtype=np.int64), 2: np.array(new_ends, dtype=np.int64)})


def fix_resize(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    out = node.outputs[0]
    if out not in masks or len(node.inputs) < 4 or not node.inputs[3] or not ctx.is_const(node.inputs[3]):
        return None
    sizes = np.array(ctx.const(node.inputs[3]), dtype=np.int64).copy()
    axis = ctx.axis_of(out)
    sizes[axis] = _kept(masks, out)
    if ctx.graph.producer(node.inputs[3]) is not None:
        # sizes computed at run time (folded for analysis): keep them if they follow the pruning
        from graphprune.frontends.fold import shape_value

        again = shape_value(ctx.graph, node.inputs[3], recompute=True,
                            shapes={t: _pruned_shape(ctx, t, masks) for t in masks})
        if again is not None and np.array_equal(np.asarray(again, dtype=np.int64), sizes):
            return None
    return NodeEdit(inputs={3: sizes})


UNARY = [
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Mish", "Swish", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs",
    "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip", "Cast", "ThresholdedRelu", "Not",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "Equal", "Less", "Greater",
    "And", "Or", "Xor", "Mod", "BitShift", "IsNaN", "IsInf",
]

_ANALYZE: dict[str, Rule] = {
    **{op: elementwise for op in UNARY},
    **{op: passthrough for op in [
        "Identity", "Dropout", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "Resize", "Upsample",
    ]},
    "Pad": pad,
    "LayerNormalization": normalization,
    "GroupNormalization": normalization,
    "Softmax": along_axis(-1),
    "LogSoftmax": along_axis(-1),
    "Hardmax": along_axis(-1),
    **{op: reduce for op in [
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    ]},
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "BatchNormalization": batchnorm,
    "InstanceNormalization": batchnorm,
    "Gemm": gemm,
    "MatMul": matmul,
    "Linear": linear,
    "Concat": concat,
    "Split": split,
    "Slice": slice_,
    "Gather": gather,
    "Reshape": layout,
    "Flatten": layout,
    "Transpose": layout,
    "Squeeze": layout,
    "Unsqueeze": layout,
    "Shape": shape_reader,
    "Size": shape_reader,
    "ConstantOfShape": no_channels,
    "Range": no_channels,
    # quantised forms of the weighted ops share their float rules
    "ConvInteger": conv,
    "QLinearConv": conv,
    "MatMulInteger": matmul,
    "QLinearMatMul": matmul,
    "QuantizeLinear": quant_linear,
    "DequantizeLinear": quant_linear,
    **{op: recurrent for op in GATES},
    "Einsum": einsum,
    **{op: control_flow for op in ("If", "Loop", "Scan")},
    "MultiheadAttention": multihead_attention,
}


def fix_layer_norm(ctx: Ctx, node: Node, masks: dict[str, np.ndarray]) -> NodeEdit | None:
    """A LayerNormalization whose channels are pruned (norm_channels "prune"): ONNX infers the
    normalised size from its input; torch's F.layer_norm spells it out (normalized_shape), so the
    torch rewriter gets the kept count. Modules (nn.LayerNorm) follow their sliced weight instead."""
    x = node.inputs[0]
    if node.name not in ctx.norm_stats_nodes or x not in masks or masks[x].all() or ctx.graph.frontend != "torch":
        return None
    return NodeEdit(attrs={"normalized_shape": [_kept(masks, x)]})


_FIXES: dict[str, Fix] = {
    "LayerNormalization": fix_layer_norm,
    "Conv": fix_conv,
    "ConvInteger": fix_conv,
    "QLinearConv": fix_conv,
    "Reshape": fix_reshape,
    "Split": fix_split,
    "Slice": fix_slice,
    "Resize": fix_resize,
}

_REFERENCES: dict[str, Reference] = {
    "LayerNormalization": reference_layer_norm,
}

# the single op table both frontends and every rewriter read
RULES: dict[str, OpRule] = {
    op: OpRule(fn, _FIXES.get(op), "all" if fn in (elementwise, concat) or op == "MatMul" else "first", COSTS.get(op),
               _REFERENCES.get(op))
    for op, fn in _ANALYZE.items()
}
