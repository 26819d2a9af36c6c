"""graphprune: structured channel pruning for CNNs (ONNX and PyTorch) with measured speed-ups."""
from graphprune.api import PruneResult, analyze, inspect, prune
from graphprune.errors import GraphpruneError

__all__ = ["prune", "analyze", "inspect", "PruneResult", "GraphpruneError", "save", "load", "finetune"]


def save(model, path) -> None:
    """Save a pruned nn.Module (see graphprune.torch_io); imports torch only when used."""
    from graphprune.torch_io import save as _save

    _save(model, path)


def load(path, map_location="cpu"):
    """Load an nn.Module written by graphprune.save (unpickles code: trusted files only)."""
    from graphprune.torch_io import load as _load

    return _load(path, map_location=map_location)


def finetune(original, slim, data, **options):
    """Label-free distillation of `original` into the pruned `slim` model (see graphprune.distill);
    imports torch only when used. Returns a FinetuneResult (model, report)."""
    from graphprune.distill import finetune as _finetune

    return _finetune(original, slim, data, **options)
