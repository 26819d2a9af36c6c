"""The project's graph IR: a topologically ordered list of ops over named tensors.

Both frontends (ONNX, torch.fx) lower into this, so the channel rules are written once.
Tensor shapes are static (the frontends resolve symbolic batch dims to 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Node:
    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    # tensors of the enclosing graph read inside this op's subgraphs (If/Loop/Scan bodies): consumers
    # like explicit inputs, but with no input slot the rewriter could adapt, so their channels are kept
    implicit: list[str] = field(default_factory=list)


@dataclass
class Graph:
    nodes: list[Node]
    shapes: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]
    name: str = "graph"
    # nodes whose values were folded into constants for analysis (e.g. Shape chains computing bounds)
    folded_nodes: set[str] = field(default_factory=set)
    # constants the frontend derived from other constants (a dequantised weight): derived tensor ->
    # [(source constant, source axis per derived axis, None where the source does not follow it)];
    # slicing the derived tensor slices its sources, which are what the written model holds
    aliases: dict[str, list[tuple[str, tuple[int | None, ...]]]] = field(default_factory=dict)
    # which If branch the cost model counts ("then"/"else"); None counts the larger one
    branch: str | None = None
    # which frontend lowered it ("onnx" or "torch"): a few rules prove rewrites for one only
    frontend: str = "onnx"

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        """Rebuild producer/consumer maps after the node list changed."""
        self._producer: dict[str, Node] = {}
        self._consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for t in node.outputs:
                if t:
                    self._producer[t] = node
            for t in node.inputs + node.implicit:
                if t:
                    self._consumers.setdefault(t, []).append(node)
        self.node_by_name = {n.name: n for n in self.nodes}

    def producer(self, tensor: str) -> Node | None:
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[Node]:
        return self._consumers.get(tensor, [])

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        if tensor in self.constants:
            return tuple(self.constants[tensor].shape)
        return self.shapes.get(tensor)

    def is_const(self, tensor: str) -> bool:
        return tensor in self.constants

    def const(self, tensor: str) -> np.ndarray | None:
        return self.constants.get(tensor)
