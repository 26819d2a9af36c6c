"""Apply a plan to the normalised ONNX model: slice bound initializers, then apply op fixes."""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.analysis.groups import Analysis
from graphprune.analysis.rules import RULES, NodeEdit
from graphprune.errors import GraphpruneError


def param_indices(analysis: Analysis, masks: dict[str, np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
    """For each bound parameter and axis, the indices that survive."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for b in analysis.bindings:
        m = masks[b.tensor]
        m = m[: len(m) // b.divisor]
        idx = np.nonzero(m)[0]
        prev = out.setdefault(b.param, {}).get(b.axis)
        if prev is not None and not np.array_equal(prev, idx):
            raise GraphpruneError(f"internal error: inconsistent slicing of '{b.param}' axis {b.axis}")
        out[b.param][b.axis] = idx
    return out


def node_edits(analysis: Analysis, masks: dict[str, np.ndarray]) -> dict[int, NodeEdit]:
    """Per node index: the fixes its rule asks for (group counts, reshape targets, split sizes)."""
    edits = {}
    for i, node in enumerate(analysis.graph.nodes):
        entry = RULES.get(node.op_type)
        if entry is None or entry.fix is None or node.name in analysis.ctx.frozen_nodes:
            continue
        try:
            edit = entry.fix(analysis.ctx, node, masks)
        except Exception as exc:  # a fix that cannot be computed must not become a traceback
            raise GraphpruneError(f"cannot rewrite {node.op_type} '{node.name}' for the pruned channels: "
                                  f"{type(exc).__name__}: {exc}") from None
        if edit is not None:
            edits[i] = edit
    return edits


def _apply_edit(model: onnx.ModelProto, node: onnx.NodeProto, edit: NodeEdit, tag: str) -> None:
    for name in edit.drop_attrs:
        for k, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[k]
                break
    for name, value in edit.attrs.items():
        for k, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[k]
                break
        node.attribute.append(helper.make_attribute(name, value))
    for idx, value in edit.inputs.items():
        new_name = f"{node.input[idx] if idx < len(node.input) and node.input[idx] else 'operand'}__gp_{tag}_{idx}"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), new_name))
        while len(node.input) <= idx:
            node.input.append("")
        node.input[idx] = new_name


def permutation_indices(analysis: Analysis, start: str, end: str, masks: dict[str, np.ndarray]) -> np.ndarray:
    """Gather indices into the pruned `start` tensor that produce the pruned `end` tensor."""
    s_ids = analysis.ctx.spaces[start].ids
    e_ids = analysis.ctx.spaces[end].ids
    position = {int(e): k for k, e in enumerate(s_ids.tolist())}
    new_pos = np.cumsum(masks[start]) - 1
    return np.array([new_pos[position[int(e)]] for e, keep in zip(e_ids.tolist(), masks[end]) if keep], dtype=np.int64)


def _replace_permute_chains(model: onnx.ModelProto, analysis: Analysis, masks: dict[str, np.ndarray]) -> None:
    """A pruned channel shuffle can no longer be spelled as reshape/transpose: emit a Gather instead."""
    index = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    drop: set[int] = set()
    for end, (start, nodes) in analysis.ctx.permutes.items():
        if masks[start].all():
            continue
        idx_name = f"{end}__gp_perm"
        model.graph.initializer.append(numpy_helper.from_array(permutation_indices(analysis, start, end, masks), idx_name))
        last = index[nodes[-1]]
        gather = helper.make_node("Gather", [start, idx_name], [end], name=f"{nodes[-1]}__gp_gather",
                                  axis=int(analysis.ctx.spaces[start].axis))
        model.graph.node[last].CopyFrom(gather)
        drop.update(index[n] for n in nodes[:-1])
    if drop:
        keep = [n for i, n in enumerate(model.graph.node) if i not in drop]
        del model.graph.node[:]
        model.graph.node.extend(keep)


def rewrite_onnx(proto: onnx.ModelProto, analysis: Analysis, removed: frozenset[int] | set[int]) -> onnx.ModelProto:
    """A new ModelProto with the removed classes' channels gone; `proto` is left untouched."""
    from graphprune.frontends import external
    from graphprune.frontends.onnx_frontend import tensor_to_array

    model = copy.deepcopy(proto)  # cheap for mapped weights: the copy refers to the same file ranges
    masks = analysis.keep_masks(removed)
    slices = param_indices(analysis, masks)
    spill = None
    for k, init in enumerate(model.graph.initializer):
        axes = slices.get(init.name)
        if not axes:
            continue
        arr = tensor_to_array(init)
        for axis, idx in axes.items():
            if len(idx) != arr.shape[axis]:
                arr = np.take(arr, idx, axis=axis)
        if arr.shape != tuple(init.dims):
            if external.is_mapped(init) and arr.size > external.MAP_MIN_ELEMENTS:
                # a big model's sliced weights go to disk, one tensor in memory at a time
                spill = spill or external.SpillFile()
                new = spill.add(arr, init)
            else:
                new = numpy_helper.from_array(np.ascontiguousarray(arr), init.name)
            model.graph.initializer[k].CopyFrom(new)
        del arr
    external.drop_pages()
    for i, edit in node_edits(analysis, masks).items():
        _apply_edit(model, model.graph.node[i], edit, str(i))
    _replace_permute_chains(model, analysis, masks)
    # stale intermediate shapes would contradict the new channel counts; inference re-derives them
    del model.graph.value_info[:]
    if model.ir_version < 4:
        from graphprune.frontends.onnx_frontend import list_initializers_as_inputs

        list_initializers_as_inputs(model)
    return model
