"""Save and load pruned nn.Modules.

A pruned module no longer matches its architecture's constructor, so a bare state_dict cannot be
loaded back into a fresh model: the file holds the pickled module (its class must be importable
when loading; GraphModules from functional edits pickle their generated code) plus its
state_dict and channel-count summary for inspection.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from graphprune.errors import GraphpruneError

FORMAT = "graphprune.torch/1"


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Channel-count attributes of every conv/norm/linear layer: the pruned structure in words."""
    keys = ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features", "num_channels")
    out = {}
    for name, m in model.named_modules():
        attrs = {k: getattr(m, k) for k in keys if isinstance(getattr(m, k, None), int)}
        if attrs:
            out[name] = {"type": type(m).__name__, **attrs}
    return out


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the pruned module through the output gate (checked path, atomic, same file mode as ONNX outputs)."""
    from graphprune.outputs import OutputGate

    payload = {"format": FORMAT, "module": model, "state_dict": model.state_dict(), "structure": describe(model)}
    OutputGate().write_with(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Load a module written by save(). Unpickles code: only load files you trust."""
    payload = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise GraphpruneError(f"{path} is not a graphprune torch file")
    model = payload["module"]
    model.load_state_dict(payload["state_dict"])
    return model
