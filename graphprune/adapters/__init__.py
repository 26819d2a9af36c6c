"""Model adapters: the only code that knows whether the model is an ONNX file or an nn.Module.

`adapter_for(model)` picks one; the pipeline (graphprune.pipeline) and its passes talk to it only
through the `Adapter` protocol. torch is imported only when the model is an nn.Module.
"""
from __future__ import annotations

import sys
from typing import Any


def is_torch_module(model: Any) -> bool:
    # an nn.Module can only exist if torch is already imported; importing it here costs seconds
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def adapter_for(model: Any, *, inplace: bool = False) -> Any:
    """OnnxAdapter for a path or ModelProto, TorchAdapter for an nn.Module (inplace: prune it, not a copy)."""
    if is_torch_module(model):
        from graphprune.adapters.torch_adapter import TorchAdapter

        return TorchAdapter(inplace=inplace)
    from graphprune.adapters.onnx_adapter import OnnxAdapter

    return OnnxAdapter()
