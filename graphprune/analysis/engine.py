"""Run the rule table over a graph: the pure dependency analysis (no I/O)."""
from __future__ import annotations

import logging
from math import prod

from graphprune.analysis.context import DEFAULT_NORM_CHANNELS, Ctx, Unresolved
from graphprune.analysis.rules import NO_MAC_OPS, RULES
from graphprune.ir.graph import Graph, Node

log = logging.getLogger("graphprune.analysis")

STANDARD_DOMAINS = ("", "ai.onnx")


def count_fixed_cost(ctx: Ctx, node: Node) -> None:
    """A frozen op's MACs still count towards the model's total, by the same formula as its rule.

    An op the table has no formula for, or whose formula cannot be evaluated (unknown shapes, a
    Loop without a constant trip count), is listed as uncounted instead of silently costing 0.
    """
    entry = RULES.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
    if entry is None:
        if node.domain in STANDARD_DOMAINS and node.op_type in NO_MAC_OPS:
            return
        ctx.unknown_costs[node.name] = f"no cost formula for {node.domain + '::' if node.domain else ''}{node.op_type}"
        return
    if entry.cost is None:
        return
    try:
        ctx.mac(node, entry.cost(ctx, node))
    except Exception as exc:  # noqa: BLE001 - malformed weights or unknown shapes: say so in the report
        ctx.unknown_costs[node.name] = f"{node.op_type}: {exc}"


def graph_macs(sub: Graph, outer: Graph, branch: str | None = None) -> float:
    """MACs of a subgraph body (If branch, Loop/Scan body): every op by its table formula.

    The body sees the enclosing graph's constants and shapes. Raises Unresolved when any op's cost
    is unknown, so the enclosing op is reported as uncounted rather than undercounted.
    """
    merged = Graph(sub.nodes, {**outer.shapes, **sub.shapes}, {**outer.constants, **sub.constants},
                   sub.inputs, sub.outputs, sub.name, branch=branch if branch is not None else outer.branch)
    ctx = Ctx(merged, body_macs=graph_macs)
    for node in merged.nodes:
        count_fixed_cost(ctx, node)
    if ctx.unknown_costs:
        name, why = next(iter(ctx.unknown_costs.items()))
        raise Unresolved(f"cost of '{name}' inside the body is unknown ({why})")
    return float(sum(m.base for m in ctx.macs))


def freeze_op(ctx: Ctx, node: Node, reason: str) -> None:
    """Conservative fallback: every channel the op touches is kept."""
    ctx.frozen_nodes[node.name] = reason
    for t in node.inputs:
        if t:
            ctx.freeze_tensor(t, reason)
    for t in node.outputs:
        if not t:
            continue
        if t in ctx.spaces:
            ctx.freeze_tensor(t, reason)
            continue
        shape = ctx.graph.shape(t)
        if shape:
            ctx.new(t, 1 if len(shape) >= 2 else 0, frozen=reason)


def run_rules(graph: Graph, norm_channels: str = DEFAULT_NORM_CHANNELS) -> Ctx:
    """`norm_channels`: see Ctx ("freeze": channels a LayerNorm takes statistics over are kept)."""
    ctx = Ctx(graph, body_macs=graph_macs, norm_channels=norm_channels)
    for t in graph.inputs:
        shape = graph.shape(t)
        if shape:
            ctx.new(t, 1 if len(shape) >= 2 else 0, frozen="model input")
    for node in graph.nodes:
        entry = RULES.get(node.op_type) if node.domain in STANDARD_DOMAINS else None
        if entry is None:
            where = f"{node.domain}::" if node.domain not in STANDARD_DOMAINS else ""
            reason = f"unsupported op {where}{node.op_type} '{node.name}'"
            log.info("freezing channels around %s", reason)
            freeze_op(ctx, node, reason)
            count_fixed_cost(ctx, node)
            continue
        n_bind, n_mac = len(ctx.bindings), len(ctx.macs)
        try:
            entry.analyze(ctx, node)
            if entry.operands == "first":
                for t in node.inputs[1:]:
                    if t and not ctx.is_const(t) and t in ctx.spaces:
                        ctx.freeze_tensor(t, f"channels used as a non-data operand of {node.op_type} '{node.name}'")
        except Unresolved as exc:
            del ctx.bindings[n_bind:], ctx.macs[n_mac:]
            reason = f"{node.op_type} '{node.name}': {exc}"
            log.info("freezing channels around %s", reason)
            freeze_op(ctx, node, reason)
            count_fixed_cost(ctx, node)
        except Exception as exc:  # a rule bug must never take the user's run down: freeze instead
            del ctx.bindings[n_bind:], ctx.macs[n_mac:]
            reason = f"{node.op_type} '{node.name}': analysis error {type(exc).__name__}: {exc}"
            log.warning("freezing channels around %s", reason)
            freeze_op(ctx, node, reason)
            count_fixed_cost(ctx, node)
    resolve_dense(ctx)
    for t in graph.outputs:
        ctx.freeze_tensor(t, "model output")
    _freeze_subgraph_reads(ctx)
    _couple_shared_params(ctx)
    return ctx


def resolve_dense(ctx: Ctx) -> None:
    """Reshaped (dense) layouts made only of attention heads, whose every slice along one axis is a
    single head after the head products tied q/k/v of each head together, get that axis as their
    channel axis, so the rewrite can resize them; every other dense layout stays frozen.

    Tensors inside a channel-permutation chain are left to the permutation rewrite, and an axis a
    consumer Gathers or Splits along is never chosen (those rewrites do not follow a channel axis).
    """
    import numpy as np

    from graphprune.analysis.spaces import Space, resolve_axis

    if not ctx.head_ids:
        return
    heads = set(ctx.uf.roots(np.asarray(ctx.head_ids, dtype=np.int64)).tolist())
    internal = {ctx.graph.node_by_name[n].outputs[0] for _, nodes in ctx.permutes.values() for n in nodes[:-1]}
    for t, sp in list(ctx.spaces.items()):
        if sp.axis is not None or t in internal:
            continue
        shape = ctx.shape(t)
        roots = ctx.uf.roots(sp.ids.ravel()).reshape(sp.ids.shape)
        if not set(np.unique(roots).tolist()) <= heads:
            continue  # only layouts the head products made whole
        banned = {int(n.attrs.get("axis", 0)) % len(shape) for n in ctx.graph.consumers(t)
                  if n.op_type in ("Gather", "Split") and n.inputs[0] == t}
        for axis in range(len(shape)):
            if shape[axis] > 1 and roots.shape[axis] == shape[axis] and axis not in banned:
                ids = resolve_axis(roots, axis, shape[axis])
                if ids is not None:
                    ctx.spaces[t] = Space(axis, ids)
                    ctx.dense_reasons.pop(t, None)
                    break


def _freeze_subgraph_reads(ctx: Ctx) -> None:
    """A tensor read inside an If/Loop/Scan body keeps all its channels: the body's ops have no
    rule-driven rewrite, so pruning the producer would hand them a tensor of the wrong width.
    A constant read there keeps every channel it is sliced along, for the same reason."""
    reads: dict[str, str] = {}
    for node in ctx.graph.nodes:
        for t in node.implicit:
            reads.setdefault(t, f"read inside the subgraph of {node.op_type} '{node.name}'")
    if not reads:
        return
    for t, reason in reads.items():
        ctx.freeze_tensor(t, reason)
    for b in ctx.bindings:
        if b.param in reads:
            ctx.freeze_tensor(b.tensor, reads[b.param])


def _couple_shared_params(ctx: Ctx) -> None:
    """A constant indexed by two tensors' channels (weight sharing) couples those channels."""
    first: dict[tuple[str, int], tuple[str, int]] = {}
    for b in ctx.bindings:
        key = (b.param, b.axis)
        ids = ctx.spaces[b.tensor].ids
        ids = ids[: len(ids) // b.divisor]
        if key in first:
            t0, d0 = first[key]
            ids0 = ctx.spaces[t0].ids
            ctx.union(ids0[: len(ids0) // d0], ids)
        else:
            first[key] = (b.tensor, b.divisor)
