"""Consumer-side masking: the reference a pruned model must equal.

Zeroing every consumer's weights that read a removed channel makes the original model compute
exactly what the pruned one does, so comparing the two checks the whole analysis + rewrite.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.analysis.groups import Analysis


def consumer_masks(analysis: Analysis, removed: frozenset[int] | set[int]) -> dict[str, list[tuple[int, np.ndarray]]]:
    """param -> [(axis, indices to zero)] for every consumer ('in') binding of a removed channel."""
    masks = analysis.keep_masks(removed)
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for b in analysis.bindings:
        if b.role != "in":
            continue
        m = masks[b.tensor]
        m = m[: len(m) // b.divisor]
        idx = np.nonzero(~m)[0]
        if len(idx):
            out.setdefault(b.param, []).append((b.axis, idx))
    return out


def mask_consumers_onnx(proto: onnx.ModelProto, analysis: Analysis, removed: frozenset[int] | set[int],
                        spill: Any = None) -> onnx.ModelProto:
    """`spill` (an external.SpillFile): where masked copies of memory-mapped weights go, so a big
    model's reference is built one tensor in memory at a time."""
    from graphprune.frontends import external
    from graphprune.frontends.onnx_frontend import tensor_to_array

    model = copy.deepcopy(proto)
    zero = consumer_masks(analysis, removed)
    for k, init in enumerate(model.graph.initializer):
        if init.name not in zero:
            continue
        arr = np.array(tensor_to_array(init))
        for axis, idx in zero[init.name]:
            index = [slice(None)] * arr.ndim
            index[axis] = idx
            arr[tuple(index)] = 0
        if spill is not None and external.is_mapped(init):
            new = spill.add(arr, init)
        else:
            new = numpy_helper.from_array(arr, init.name)
        model.graph.initializer[k].CopyFrom(new)
        del arr
    external.drop_pages()
    _reference_statistics(model, analysis, removed)
    return model


def _reference_statistics(model: onnx.ModelProto, analysis: Analysis, removed: frozenset[int] | set[int]) -> None:
    """Ops whose statistics exclude removed channels (ctx.norm_channels == "prune") are replaced by
    their rule's reference form, which takes the statistics over the kept channels of the full-width
    tensor; ops that lose no channel stay as they are."""
    from graphprune.analysis.rules import RULES

    stats = analysis.ctx.norm_stats_nodes
    if not stats or not removed:
        return
    masks = analysis.keep_masks(removed)
    index = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
    replace: dict[int, list[onnx.NodeProto]] = {}
    for name, x in stats.items():
        keep = masks[x]
        if keep.all():
            continue
        node = analysis.graph.node_by_name[name]
        scale = analysis.graph.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
        dtype = scale.dtype if scale is not None else np.dtype(np.float32)
        new_nodes, consts = RULES[node.op_type].reference(node, keep, analysis.graph.shape(x), dtype)
        for cname, value in consts.items():
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), cname))
        replace[index[name]] = [helper.make_node(n.op_type, n.inputs, n.outputs, name=n.name, **n.attrs)
                                for n in new_nodes]
    if not replace:
        return
    nodes = []
    for i, n in enumerate(model.graph.node):
        nodes.extend(replace.get(i, [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
