"""Run the rule table over a graph: the pure dependency analysis (no I/O)."""
from __future__ import annotations

import logging
from math import prod

from graphprune.analysis.context import Ctx, Unresolved
from graphprune.analysis.rules import RULES
from graphprune.ir.graph import Graph, Node

log = logging.getLogger("graphprune.analysis")

STANDARD_DOMAINS = ("", "ai.onnx")


def _static_macs(ctx: Ctx, node: Node) -> None:
    """MACs of a frozen weighted op: they still count towards the model's total."""
    try:
        if node.op_type == "MatMul":
            ctx.mac(node, prod(ctx.shape(node.outputs[0])) * ctx.shape(node.inputs[0])[-1])
        elif node.op_type in ("Conv", "ConvTranspose") and ctx.is_const(node.inputs[1]):
            w = ctx.const(node.inputs[1])
            # Conv iterates over output positions, ConvTranspose over input positions
            ref = ctx.shape(node.outputs[0] if node.op_type == "Conv" else node.inputs[0])
            ctx.mac(node, ref[0] * w.shape[0] * w.shape[1] * prod(w.shape[2:]) * prod(ref[2:]))
        elif node.op_type == "Linear" and ctx.is_const(node.inputs[1]):
            w = ctx.const(node.inputs[1])
            ctx.mac(node, prod(ctx.shape(node.inputs[0])[:-1]) * w.shape[0] * w.shape[1])
        elif node.op_type == "Gemm" and ctx.is_const(node.inputs[1]):
            w = ctx.const(node.inputs[1])
            ctx.mac(node, ctx.shape(node.inputs[0])[0] * w.shape[0] * w.shape[1])
    except Exception:  # noqa: BLE001 - malformed weights (wrong rank) must not escape the freeze fallback
        pass


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


def run_rules(graph: Graph) -> Ctx:
    ctx = Ctx(graph)
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
            _static_macs(ctx, node)
        except Exception as exc:  # a rule bug must never take the user's run down: freeze instead
            del ctx.bindings[n_bind:], ctx.macs[n_mac:]
            reason = f"{node.op_type} '{node.name}': analysis error {type(exc).__name__}: {exc}"
            log.warning("freezing channels around %s", reason)
            freeze_op(ctx, node, reason)
            _static_macs(ctx, node)
    for t in graph.outputs:
        ctx.freeze_tensor(t, "model output")
    _freeze_subgraph_reads(ctx)
    _couple_shared_params(ctx)
    return ctx


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
