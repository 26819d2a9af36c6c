"""graphprune: structured channel pruning for CNNs (ONNX and PyTorch) with measured speed-ups."""
from graphprune.api import PruneResult, analyze, prune
from graphprune.errors import GraphpruneError

__all__ = ["prune", "analyze", "PruneResult", "GraphpruneError"]
