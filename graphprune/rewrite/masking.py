"""Consumer-side masking: the reference a pruned model must equal.

Zeroing every consumer's weights that read a removed channel makes the original model compute
exactly what the pruned one does, so comparing the two checks the whole analysis + rewrite.
"""
from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper

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


def mask_consumers_onnx(proto: onnx.ModelProto, analysis: Analysis, removed: frozenset[int] | set[int]) -> onnx.ModelProto:
    model = copy.deepcopy(proto)
    zero = consumer_masks(analysis, removed)
    for k, init in enumerate(model.graph.initializer):
        if init.name not in zero:
            continue
        arr = numpy_helper.to_array(init).copy()
        for axis, idx in zero[init.name]:
            index = [slice(None)] * arr.ndim
            index[axis] = idx
            arr[tuple(index)] = 0
        model.graph.initializer[k].CopyFrom(numpy_helper.from_array(arr, init.name))
    return model
