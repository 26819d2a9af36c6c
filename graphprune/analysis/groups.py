"""Channel classes and groups: the result of the dependency analysis, in the terms users see.

A *class* is one set of coupled channel positions (removed together). A *group* is the set of
classes that touch exactly the same tensors, e.g. the 256 channels of one residual stream.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS, Binding, Ctx, MacTerm
from graphprune.analysis.engine import run_rules
from graphprune.ir.graph import Graph


@dataclass
class Group:
    id: int
    classes: list[int]
    tensors: list[str]
    frozen: bool
    reason: str | None
    nodes: list[str] = field(default_factory=list)
    frozen_classes: int = 0

    @property
    def size(self) -> int:
        return len(self.classes)


class Analysis:
    """Dependency analysis of one graph: groups, bindings, and a cost model over kept channels."""

    def __init__(self, graph: Graph, ctx: Ctx) -> None:
        self.graph = graph
        self.ctx = ctx
        self.bindings: list[Binding] = ctx.bindings
        self.mac_terms: list[MacTerm] = ctx.macs
        # further cost models (e.g. measured latency) registered by passes, same term form as MACs
        self.extra_costs: dict[str, list[tuple[float, tuple[str, ...]]]] = {}
        uf = ctx.uf
        # roots per axis-form tensor; dense tensors are frozen by construction
        self.roots: dict[str, np.ndarray] = {}
        for t, sp in ctx.spaces.items():
            if sp.axis is not None:
                self.roots[t] = uf.roots(sp.ids)
        self.frozen_reason: dict[int, str] = {r: why for r, why in uf.frozen.items()}
        # dense tensors inside a layout chain that nets out to a permutation are not frozen
        by_name = graph.node_by_name
        self.permute_internal = {
            by_name[n].outputs[0] for _, nodes in ctx.permutes.values() for n in nodes[:-1]
        }
        for t, sp in ctx.spaces.items():
            if sp.axis is None and t not in self.permute_internal:
                for r in np.unique(uf.roots(sp.ids.ravel())).tolist():
                    self.frozen_reason.setdefault(r, ctx.dense_reasons.get(t, f"reshaped layout at '{t}'"))
        # which tensors each class touches, and how many positions it has in each
        touches: dict[int, list[tuple[str, int]]] = {}
        for t, roots in self.roots.items():
            uniq, counts = np.unique(roots, return_counts=True)
            for r, c in zip(uniq.tolist(), counts.tolist()):
                touches.setdefault(r, []).append((t, c))
        self.class_touches = touches
        by_sig: dict[tuple[str, ...], list[int]] = {}
        for r in sorted(touches):
            by_sig.setdefault(tuple(t for t, _ in touches[r]), []).append(r)
        tensor_nodes: dict[str, set[str]] = {}
        for b in self.bindings:
            tensor_nodes.setdefault(b.tensor, set()).add(b.node)
        self.groups: list[Group] = []
        for sig, classes in sorted(by_sig.items(), key=lambda kv: kv[1][0]):
            frozen_n = sum(1 for r in classes if r in self.frozen_reason)
            reason = next((self.frozen_reason[r] for r in classes if r in self.frozen_reason), None)
            nodes = sorted({n for t in sig for n in tensor_nodes.get(t, ())})
            self.groups.append(
                Group(len(self.groups), classes, list(sig), frozen_n == len(classes), reason, nodes, frozen_n)
            )
        self.group_of: dict[int, int] = {r: g.id for g in self.groups for r in g.classes}

    # -- queries ------------------------------------------------------------------------------
    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if not g.frozen]

    def is_frozen(self, cls: int) -> bool:
        return cls in self.frozen_reason

    def channels(self, tensor: str) -> int:
        return len(self.roots[tensor])

    def keep_masks(self, removed: set[int] | frozenset[int]) -> dict[str, np.ndarray]:
        """Per axis-form tensor: which channel positions survive."""
        if not removed:
            return {t: np.ones(len(r), dtype=bool) for t, r in self.roots.items()}
        rem = np.fromiter(removed, dtype=np.int64)
        return {t: ~np.isin(r, rem) for t, r in self.roots.items()}

    def class_slices(self, cls: int) -> list[tuple[str, int, np.ndarray, str]]:
        """(param, axis, indices, role) of every parameter slice that belongs to channel class `cls`."""
        out = []
        for b in self.bindings:
            roots = self.roots[b.tensor]
            roots = roots[: len(roots) // b.divisor]
            idx = np.nonzero(roots == cls)[0]
            if len(idx):
                out.append((b.param, b.axis, idx, b.role))
        return out

    # -- costs --------------------------------------------------------------------------------
    def cost_terms(self, kind: str) -> list[tuple[float, tuple[str, ...]]]:
        """Cost as a sum of base * prod(kept fraction of each tensor) terms."""
        if kind in self.extra_costs:
            return self.extra_costs[kind]
        if kind == "macs":
            return [(m.base, m.tensors) for m in self.mac_terms]
        if kind == "params":
            axes: dict[str, dict[int, str]] = {}
            for b in self.bindings:
                axes.setdefault(b.param, {}).setdefault(b.axis, b.tensor)
            terms = []
            for name in self.param_names():
                value = self.graph.constants[name]
                terms.append((float(value.size), tuple(axes.get(name, {}).values())))
            return terms
        raise ValueError(f"unknown cost kind {kind!r}")

    def param_names(self) -> list[str]:
        """Floating-point constants read by some op: the model's parameters (a QDQ weight counts once,
        as its dequantised value; integer weights of QLinearConv/ConvInteger count as they are)."""
        used = _used_tensors(self.graph)
        from graphprune.analysis.rules import SLOTS

        quant_weights = {n.inputs[SLOTS[n.op_type][1]] for n in self.graph.nodes
                         if n.op_type in ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul")}
        return [
            name for name, v in self.graph.constants.items()
            if name in used and v.size > 1 and (np.issubdtype(v.dtype, np.floating) or name in quant_weights)
        ]

    def cost(self, kind: str, removed: set[int] | frozenset[int] = frozenset()) -> float:
        masks = self.keep_masks(removed)
        total = 0.0
        for base, tensors in self.cost_terms(kind):
            f = base
            for t in tensors:
                m = masks[t]
                f *= m.sum() / len(m)
            total += f
        return float(total)

    def macs(self, removed: set[int] | frozenset[int] = frozenset()) -> float:
        return self.cost("macs", removed)

    def params(self, removed: set[int] | frozenset[int] = frozenset()) -> float:
        return self.cost("params", removed)


def _used_tensors(graph: Graph) -> set[str]:
    """Tensors read by any op, including ops inside subgraph bodies (which read outer weights)."""
    used: set[str] = set()
    for n in graph.nodes:
        if n.name in graph.folded_nodes:
            continue  # read only to derive a constant (a dequantised weight) that is counted itself
        used.update(n.inputs)
        for v in n.attrs.values():
            if isinstance(v, Graph):
                used |= _used_tensors(v)
    return used


def analyze_graph(graph: Graph, norm_channels: str = DEFAULT_NORM_CHANNELS) -> Analysis:
    """Pure analysis: IR graph in, groups and cost model out. `norm_channels="prune"` makes channels
    a LayerNorm normalises over prunable, its statistics then taken over the kept channels."""
    return Analysis(graph, run_rules(graph, norm_channels))
