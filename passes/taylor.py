"""First-order Taylor importance (Molchanov et al.) for nn.Modules.

The loss change from removing a channel class is approximated by |sum over the class's
parameter slices of w * dL/dw|, computed per batch and accumulated over batches. It needs the
module behind the analysis (PyTorch frontend) and data, so it is not one of the weight-only
CRITERIA the ONNX path shares.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import numpy as np
import torch

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError

Scores = dict[int, float]


def taylor(analysis: Analysis, *, model: torch.nn.Module, batches: Iterable[Any],
           loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], max_batches: int | None = None,
           **_: object) -> Scores:
    """Scores per class; `loss_fn(model, batch)` returns a scalar loss for one batch."""
    params = dict(model.named_parameters())
    bound = [b for b in analysis.bindings if b.param in params]
    if not bound:
        raise GraphpruneError("taylor: no pruned parameter of the model is trainable")
    roots = {b.tensor: analysis.roots[b.tensor] for b in bound}
    scores: dict[int, float] = defaultdict(float)
    was_training = model.training
    model.train()
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            per_class: dict[int, float] = defaultdict(float)
            for b in bound:
                p = params[b.param]
                if p.grad is None:
                    continue
                contrib = (p.detach() * p.grad).double()
                dims = [d for d in range(contrib.ndim) if d != b.axis]
                vec = (contrib.sum(dim=dims) if dims else contrib).cpu().numpy()
                r = roots[b.tensor][: len(roots[b.tensor]) // b.divisor]
                uniq, inv = np.unique(r, return_inverse=True)
                for cls, v in zip(uniq.tolist(), np.bincount(inv, weights=vec).tolist()):
                    per_class[cls] += v
            for cls, v in per_class.items():
                scores[cls] += abs(v)
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n == 0:
        raise GraphpruneError("taylor: the batch iterator gave no batches")
    return {cls: v / n for cls, v in scores.items()}
