"""Apply a plan to an nn.Module: slice parameters/buffers and update module attributes.

Slicing uses the same `param_indices` and rule fixes (`RULES[op].fix`) as the ONNX rewriter.
Fixes on modules (conv `groups`) become attribute changes; fixes on functional code (reshape
targets, split sizes, slice bounds, channel-shuffle permutations) become fx node edits, and then
the result is the edited GraphModule instead of the user's own module class.
"""
from __future__ import annotations

import copy
import operator

import numpy as np
import torch
import torch.fx
from torch import nn

from graphprune.analysis.groups import Analysis
from graphprune.analysis.rules import NodeEdit
from graphprune.rewrite.masking import consumer_masks
from graphprune.rewrite.onnx_rewrite import node_edits, param_indices, permutation_indices


def _owner(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    mod_path, _, attr = qualname.rpartition(".")
    return (root.get_submodule(mod_path) if mod_path else root), attr


def _lookup(root: nn.Module, qualname: str) -> torch.Tensor | None:
    try:
        owner, attr = _owner(root, qualname)
    except AttributeError:
        return None
    t = getattr(owner, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _replace_tensor(roots: list[nn.Module], qualname: str, value: torch.Tensor) -> None:
    """Swap the tensor at `qualname` (parameter or buffer) in every root that has it."""
    new = None
    for root in roots:
        try:
            owner, attr = _owner(root, qualname)
        except AttributeError:
            continue
        old = getattr(owner, attr, None)
        if not isinstance(old, torch.Tensor):
            continue
        if new is None:
            new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
        if attr in owner._parameters:
            owner._parameters[attr] = new
        elif attr in owner._buffers:
            owner._buffers[attr] = new
        else:
            setattr(owner, attr, new)


def _sync_attributes(root: nn.Module) -> None:
    """Channel-count attributes follow the (sliced) parameter shapes."""
    for m in root.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            if m.transposed:
                m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()


def _reshape_args(fx: torch.fx.Node, new_shape: np.ndarray, old_shape: tuple[int, ...]) -> None:
    """Put the pruned channel count into a view/reshape call, keeping -1 and batch expressions."""
    args = list(fx.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        dims, pack = list(args[1]), True
    else:
        dims, pack = args[1:], False
    if len(dims) != len(new_shape):
        raise ValueError(f"cannot edit reshape '{fx.name}'")
    for k, (new, old) in enumerate(zip(new_shape.tolist(), old_shape)):
        if new != old and not (isinstance(dims[k], int) and dims[k] == -1):
            dims[k] = int(new)
    fx.args = (args[0], tuple(dims)) if pack else (args[0], *dims)


def _apply_fx_edit(fx: torch.fx.Node, op: str, edit: NodeEdit, analysis: Analysis, ir_node) -> None:
    if op == "Reshape":
        old = analysis.graph.constants[ir_node.inputs[1]]
        _reshape_args(fx, np.asarray(edit.inputs[1]), tuple(int(v) for v in old))
    elif op == "Split":
        sizes = [int(s) for s in edit.attrs["split"]]
        x = fx.args[0]
        dim = int(ir_node.attrs["axis"])
        fx.op, fx.target, fx.args, fx.kwargs = "call_function", torch.split, (x, sizes, dim), {}
    elif op == "Slice" and fx.target is operator.getitem:
        src, idx = fx.args
        tup = list(idx) if isinstance(idx, tuple) else [idx]
        for a, s, e in zip(ir_node.attrs["axes"], edit.attrs["starts"], edit.attrs["ends"]):
            step = tup[a].step if isinstance(tup[a], slice) else None
            tup[a] = slice(int(s), int(e), step)
        fx.args = (src, tuple(tup))
    elif op == "Slice" and fx.op == "call_function" and fx.args and len(fx.args) > 1 \
            and not isinstance(fx.args[1], tuple):  # aten.slice(x, dim, start, end, step) from torch.export
        args = list(fx.args) + [None] * (5 - len(fx.args))
        args[2], args[3] = int(edit.attrs["starts"][0]), int(edit.attrs["ends"][0])
        fx.args = tuple(args[:4]) + ((args[4],) if args[4] is not None else ())
    elif op == "LayerNormalization":  # F.layer_norm / aten.layer_norm: normalized_shape is argument 1
        shape = tuple(int(v) for v in edit.attrs["normalized_shape"])
        if len(fx.args) > 1:
            fx.args = (fx.args[0], shape) + tuple(fx.args[2:])
        else:
            fx.kwargs = {**fx.kwargs, "normalized_shape": shape}
    elif op == "Conv" and "group" in edit.attrs:  # F.conv2d / aten.conv2d: groups is argument 6
        if len(fx.args) > 6:
            fx.args = fx.args[:6] + (int(edit.attrs["group"]),) + fx.args[7:]
        else:
            fx.kwargs = {**fx.kwargs, "groups": int(edit.attrs["group"])}
    else:
        raise ValueError(f"no torch rewrite for a {op} fix on '{fx.name}'")


def rewrite_module(analysis: Analysis, removed: frozenset[int] | set[int]) -> nn.Module:
    """Prune the traced module in place; returns it, or an edited GraphModule when functional code changed."""
    traced = analysis.traced
    root, gm = traced.root, traced.gm
    masks = analysis.keep_masks(removed)
    with torch.no_grad():
        for name, axes in param_indices(analysis, masks).items():
            t = _lookup(root, name)
            if t is None:
                t = _lookup(gm, name)
            value = t.detach()
            for axis, idx in axes.items():
                if len(idx) != value.shape[axis]:
                    value = value.index_select(axis, torch.as_tensor(idx, dtype=torch.long, device=value.device))
            if value.shape != t.shape:
                _replace_tensor([root, gm], name, value.contiguous().clone())
    graph_edited = False
    for i, edit in node_edits(analysis, masks).items():
        ir_node = analysis.graph.nodes[i]
        fx = traced.origin[ir_node.name]
        if fx.op == "call_module":
            mod = gm.get_submodule(str(fx.target))
            if "group" in edit.attrs:
                mod.groups = int(edit.attrs["group"])
            continue
        _apply_fx_edit(fx, ir_node.op_type, edit, analysis, ir_node)
        graph_edited = True
    graph_edited |= _replace_permutes(analysis, masks)
    _sync_attributes(root)
    _sync_attributes(gm)
    if not graph_edited:
        return root
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _replace_permutes(analysis: Analysis, masks: dict[str, np.ndarray]) -> bool:
    """A pruned channel shuffle can no longer be spelled as view/transpose: use index_select."""
    traced = analysis.traced
    gm = traced.gm
    edited = False
    for k, (end, (start, nodes)) in enumerate(sorted(analysis.ctx.permutes.items())):
        if masks[start].all():
            continue
        idx = torch.as_tensor(permutation_indices(analysis, start, end, masks), dtype=torch.long)
        buf = f"_gp_perm_{k}"
        gm.register_buffer(buf, idx)
        last = traced.origin[nodes[-1]]
        src = traced.tensor_fx[start]
        with gm.graph.inserting_before(last):
            get = gm.graph.get_attr(buf)
            sel = gm.graph.call_function(torch.index_select, (src, int(analysis.ctx.spaces[start].axis), get))
        last.replace_all_uses_with(sel)
        gm.graph.erase_node(last)
        traced.origin[nodes[-1]] = sel
        edited = True
    return edited


def mask_consumers_module(model: nn.Module, analysis: Analysis, removed: frozenset[int] | set[int]) -> nn.Module:
    """Deep copy of `model` with every consumer weight that reads a removed channel zeroed (the reference).

    Under norm_channels "prune" a LayerNorm that lost channels takes its statistics over the kept
    ones: the copy is then traced again and those calls run `kept_stats_layer_norm` (a GraphModule
    that computes what the original does under that semantics, on full-width tensors)."""
    masked = copy.deepcopy(model)
    tensors = dict(masked.named_parameters())
    tensors.update(dict(masked.named_buffers()))
    with torch.no_grad():
        for name, cuts in consumer_masks(analysis, removed).items():
            t = tensors[name]
            for axis, idx in cuts:
                t.index_fill_(axis, torch.as_tensor(idx, dtype=torch.long), 0.0)
    masks = analysis.keep_masks(removed)
    keeps = {name: masks[x] for name, x in analysis.ctx.norm_stats_nodes.items() if not masks[x].all()}
    return _kept_stats_reference(masked, analysis, keeps) if keeps else masked


def kept_stats_layer_norm(x: torch.Tensor, keep: tuple[bool, ...], weight: torch.Tensor | None,
                          bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis with its statistics taken over the `keep` positions only (the
    masked reference of a pruned LayerNorm; removed positions are only read by zeroed consumers)."""
    m = torch.tensor(keep, dtype=x.dtype, device=x.device)
    k = m.sum()
    d = x - (x * m).sum(-1, keepdim=True) / k
    y = d / torch.sqrt(((d * m) ** 2).sum(-1, keepdim=True) / k + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def _kept_stats_reference(masked: nn.Module, analysis: Analysis, keeps: dict[str, np.ndarray]) -> nn.Module:
    """Trace the masked copy again (fx names its nodes as in the analysed trace) and route every
    LayerNorm in `keeps` (IR node -> keep mask of its input) through kept_stats_layer_norm."""
    traced = analysis.traced
    gm = torch.fx.symbolic_trace(masked)
    by_name = {n.name: n for n in gm.graph.nodes}
    for ir_name, keep in keeps.items():
        node = by_name.get(traced.origin[ir_name].name)
        if node is None:
            raise RuntimeError(f"cannot find LayerNorm '{ir_name}' in the re-traced reference")
        flags = tuple(bool(v) for v in keep)
        with gm.graph.inserting_before(node):
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                w = gm.graph.get_attr(f"{node.target}.weight") if mod.weight is not None else None
                b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                args = (node.args[0], flags, w, b, float(mod.eps))
            else:
                a = list(node.args) + [None] * (5 - len(node.args))
                w, b = a[2] if a[2] is not None else node.kwargs.get("weight"), a[3] if a[3] is not None else node.kwargs.get("bias")
                eps = a[4] if a[4] is not None else node.kwargs.get("eps", 1e-5)
                args = (a[0], flags, w, b, float(eps))
            new = gm.graph.call_function(kept_stats_layer_norm, args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
