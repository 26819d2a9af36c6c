"""State shared by the op rules while the dependency analysis walks the graph."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.analysis.spaces import Space, UnionFind, broadcastable, dense_labels, resolve_axis
from graphprune.ir.graph import Graph, Node


NORM_CHANNELS = ("freeze", "prune")
# the one default of every entry point (analysis, API, CLI): class ids differ between the two modes,
# so analyze() and prune() must agree for a plan from one to apply to the other
DEFAULT_NORM_CHANNELS = "prune"


class Unresolved(Exception):
    """Raised inside a rule when it cannot prove how channels map; the engine then freezes the op."""


@dataclass(frozen=True)
class Binding:
    """Axis `axis` of constant `param` is indexed by the channel positions of `tensor`.

    With divisor g > 1 (grouped conv weights) the param axis holds one group's worth of positions:
    param index i <-> tensor position i of the first group (all groups are pruned alike).
    role: "out" (a producer's filters), "in" (a consumer's input columns) or "coupled" (BN, bias-like).
    """

    param: str
    axis: int
    tensor: str
    role: str
    node: str
    divisor: int = 1


@dataclass(frozen=True)
class MacTerm:
    """base multiply-accumulates, scaled by the kept fraction of each listed tensor's channels."""

    node: str
    base: float
    tensors: tuple[str, ...]


class Ctx:
    def __init__(self, graph: Graph, body_macs: Any = None, norm_channels: str = DEFAULT_NORM_CHANNELS) -> None:
        self.graph = graph
        # channels an op takes statistics over (LayerNorm over channels): "freeze" keeps them all;
        # "prune" makes them prunable, the statistics then taken over the kept channels only
        if norm_channels not in NORM_CHANNELS:
            raise ValueError(f"norm_channels must be one of {NORM_CHANNELS}, not {norm_channels!r}")
        self.norm_channels = norm_channels
        # nodes whose statistics run over kept channels (node -> its data input), for the reference
        self.norm_stats_nodes: dict[str, str] = {}
        # MACs of a subgraph body (If/Loop/Scan): the engine passes its own walker here, so the rule
        # table can cost bodies with itself without importing the engine (which imports the table)
        self.body_macs = body_macs
        self.uf = UnionFind()
        self.spaces: dict[str, Space] = {}
        self.bindings: list[Binding] = []
        self.macs: list[MacTerm] = []
        self.frozen_nodes: dict[str, str] = {}
        # ops that do arithmetic the cost model cannot count (node -> why): reported, never silently 0
        self.unknown_costs: dict[str, str] = {}
        # layout chains (e.g. channel shuffle: Reshape -> Transpose -> Reshape) that net out to a pure
        # channel permutation: pending dense tensor -> (start tensor, chain nodes) while walking, and
        # resolved end tensor -> (start tensor, chain nodes); rewriters replace those chains by a Gather
        self.chains: dict[str, tuple[str, list[str]]] = {}
        self.permutes: dict[str, tuple[str, list[str]]] = {}
        # dense tensors left unresolved by a layout op (tensor -> why): frozen unless resolve_dense
        # finds one axis along which every slice is a single class
        self.dense_reasons: dict[str, str] = {}
        # one element id per attention head tied together by a head product (see rules._head_product)
        self.head_ids: list[int] = []

    # -- shapes -------------------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int, ...]:
        s = self.graph.shape(tensor)
        if s is None:
            raise Unresolved(f"unknown shape of tensor '{tensor}'")
        return s

    def rank(self, tensor: str) -> int:
        return len(self.shape(tensor))

    def is_const(self, tensor: str) -> bool:
        return self.graph.is_const(tensor)

    def const(self, tensor: str) -> np.ndarray:
        v = self.graph.const(tensor)
        if v is None:
            raise Unresolved(f"tensor '{tensor}' is not a constant")
        return v

    # -- spaces -------------------------------------------------------------------------------
    def space(self, tensor: str) -> Space | None:
        return self.spaces.get(tensor)

    def axis_of(self, tensor: str) -> int | None:
        sp = self.spaces.get(tensor)
        return None if sp is None else sp.axis

    def ids(self, tensor: str, axis: int) -> np.ndarray | None:
        """Element ids along `axis`, or None when that axis does not carry single channels."""
        sp = self.spaces.get(tensor)
        if sp is None:
            return None
        shape = self.shape(tensor)
        axis = axis % len(shape)
        if sp.axis == axis:
            return sp.ids
        return resolve_axis(dense_labels(sp, shape), axis, shape[axis])

    def labels(self, tensor: str) -> np.ndarray | None:
        """Compressed per-position labels (broadcastable to the tensor's shape)."""
        sp = self.spaces.get(tensor)
        if sp is None:
            return None
        return dense_labels(sp, self.shape(tensor))

    def set_axis(self, tensor: str, axis: int, ids: np.ndarray) -> None:
        shape = self.shape(tensor)
        axis = axis % len(shape)
        if shape[axis] != len(ids):
            raise Unresolved(f"channel count mismatch on '{tensor}'")
        self.spaces[tensor] = Space(axis, np.asarray(ids, dtype=np.int64))

    def set_dense(self, tensor: str, labels: np.ndarray, prefer: tuple[int, ...] = (1, -1)) -> None:
        """Store layout-op output labels, collapsing to axis form when some axis resolves."""
        shape = self.shape(tensor)
        if not broadcastable(labels, tuple(shape)):
            raise Unresolved(f"layout mismatch on '{tensor}'")
        for axis in prefer:
            if len(shape) < 2:
                break
            ids = resolve_axis(labels, axis % len(shape), shape[axis % len(shape)])
            if ids is not None and shape[axis % len(shape)] > 1:
                self.spaces[tensor] = Space(axis % len(shape), ids)
                return
        self.spaces[tensor] = Space(None, np.ascontiguousarray(labels))

    def new(self, tensor: str, axis: int, frozen: str | None = None) -> np.ndarray:
        shape = self.shape(tensor)
        axis = axis % len(shape)
        ids = self.uf.new(shape[axis])
        if frozen:
            self.uf.freeze(ids, frozen)
        self.spaces[tensor] = Space(axis, ids)
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if len(a) != len(b):
            raise Unresolved("coupled channel counts differ")
        self.uf.union_arrays(a, b)

    def freeze_tensor(self, tensor: str, reason: str) -> None:
        sp = self.spaces.get(tensor)
        if sp is not None:
            self.uf.freeze(sp.ids.ravel(), reason)

    # -- costs and parameters -------------------------------------------------------------------
    def bind(self, param: str, axis: int, tensor: str, role: str, node: Node, divisor: int = 1) -> None:
        value = self.const(param)
        axis = axis % value.ndim
        sp = self.spaces.get(tensor)
        if sp is None or sp.axis is None:
            raise Unresolved(f"'{tensor}' has no channel axis to bind '{param}' to")
        if value.shape[axis] * divisor != len(sp.ids):
            raise Unresolved(f"'{param}' axis {axis} does not match channels of '{tensor}'")
        self._bind_with_sources(param, axis, tensor, role, node.name, divisor)

    def _bind_with_sources(self, param: str, axis: int, tensor: str, role: str, node: str, divisor: int) -> None:
        """A derived constant (dequantised weight) is not in the written model: bind what it comes from."""
        self.bindings.append(Binding(param, axis, tensor, role, node, divisor))
        for source, axis_map in self.graph.aliases.get(param, ()):
            if axis < len(axis_map) and axis_map[axis] is not None:
                self._bind_with_sources(source, axis_map[axis], tensor, role, node, divisor)

    def mac(self, node: Node, base: float, *tensors: str) -> None:
        self.macs.append(MacTerm(node.name, float(base), tuple(tensors)))
