"""Allocation: turn class scores into a set of removed classes that meets a cost target.

Global: remove the globally least important chunk (round_to classes of one group) until the
cost is at or under target. Speed (the default for FLOPs targets): global, with each chunk's
importance scaled by the MACs it saves per unit of estimated time it saves, so at the same FLOPs
the channels whose time is mostly memory traffic (depthwise convs, high-resolution activations,
SE gates) go first. Uniform: every group keeps the same fraction, found by bisection,
then topped up with global chunks so the target is met as tightly as the global strategy.
"""
from __future__ import annotations

import fnmatch
import heapq
from math import prod
from typing import Mapping

from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan
from graphprune.errors import GraphpruneError


# "sensitivity" (passes/sensitivity.py) measures the model on calibration data, then allocates with
# the global greedy over its measured prices; "speed" is global ordered by importance per time saved
STRATEGIES = ("speed", "global", "uniform", "sensitivity")


class IncrementalCost:
    """Cost of the model as classes are removed, updating only the terms a class touches."""

    def __init__(self, analysis: Analysis, kind: str) -> None:
        self.analysis = analysis
        terms = analysis.cost_terms(kind)
        self.size = {t: len(r) for t, r in analysis.roots.items()}
        self.kept = dict(self.size)
        self.bases = [b for b, _ in terms]
        self.tensors = [ts for _, ts in terms]
        self.terms_of: dict[str, list[int]] = {}
        for i, ts in enumerate(self.tensors):
            for t in ts:
                self.terms_of.setdefault(t, []).append(i)
        self.values = list(self.bases)
        self.base_total = float(sum(self.bases))
        self.total = self.base_total

    def _update(self, cls: int, sign: int) -> None:
        touched: set[int] = set()
        for t, c in self.analysis.class_touches[cls]:
            self.kept[t] -= sign * c
            touched.update(self.terms_of.get(t, ()))
        for i in touched:
            v = self.bases[i] * prod(self.kept[t] / self.size[t] for t in self.tensors[i])
            self.total += v - self.values[i]
            self.values[i] = v

    def remove(self, cls: int) -> None:
        self._update(cls, 1)

    def restore(self, cls: int) -> None:
        self._update(cls, -1)


def ignore_reasons(analysis: Analysis, patterns: list[str] | tuple[str, ...]) -> tuple[dict[int, str], list[str]]:
    """Classes the --ignore glob patterns protect, each with why, and the patterns that match nothing.

    A pattern matches node names (exactly or as a glob) and parameter names (glob). Every channel an
    ignored node writes or reads is protected: the reads are why a group produced elsewhere (say a
    residual stream) is kept whole when it feeds an ignored layer, and the reason says so.
    """
    reasons: dict[int, str] = {}
    matched: dict[str, int] = {p: 0 for p in patterns}

    def mark(tensor: str, why: str) -> None:
        for r in analysis.roots[tensor].tolist():
            reasons.setdefault(r, why)

    for node in analysis.graph.nodes:
        hit = [p for p in patterns if fnmatch.fnmatch(node.name, p) or p == node.name]
        if not hit:
            continue
        for p in hit:
            matched[p] += 1
        for t in node.outputs:
            if t in analysis.roots:
                mark(t, f"written by ignored layer {node.name} (--ignore {hit[0]})")
        for t in node.inputs:
            if t in analysis.roots:
                mark(t, f"kept whole: feeds ignored layer {node.name} (--ignore {hit[0]})")
    for b in analysis.bindings:
        hit = [p for p in patterns if fnmatch.fnmatch(b.param, p)]
        for p in hit:
            matched[p] += 1
        if hit:
            mark(b.tensor, f"parameter {b.param} matches --ignore {hit[0]}")
    return reasons, [p for p in patterns if not matched[p]]


def ignored_classes(analysis: Analysis, patterns: list[str] | tuple[str, ...]) -> set[int]:
    """Classes touching any node or parameter whose name matches one of the glob patterns."""
    return set(ignore_reasons(analysis, patterns)[0]) if patterns else set()


def group_multiples(analysis: Analysis, multiple: int, halve: bool = True) -> dict[int, int]:
    """Per-group channel multiple for `--round-to auto`.

    halve=False: every group keeps multiples of the hardware's multiple. On a blocked kernel a count
    between two multiples costs as much as the next one up, so pruning a 16-wide group to 8 (or a
    grouped conv's 16-channel groups to 8) spends FLOPs budget without saving time; such groups stay
    whole and the budget goes where it buys speed.
    halve=True (the fallback when the strict multiples cannot reach the target, see auto_multiples):
    the multiple is halved (down to 1) for groups narrower than twice it, so small layers stay prunable.
    """
    out = {}
    for g in analysis.groups:
        m = max(1, int(multiple))
        while halve and m > 1 and g.size < 2 * m:
            m //= 2
        out[g.id] = m
    return out


def floor_fraction(analysis: Analysis, kind: str, round_to: int | Mapping[int, int],
                   protected: set[int] | None = None) -> float:
    """The lowest cost fraction reachable at these multiples: every removable chunk removed."""
    cost = IncrementalCost(analysis, kind)
    if cost.base_total <= 0:
        return 1.0
    for chunks in _chunks(analysis, {}, protected or set(), round_to, normalize=False).values():
        for chunk in chunks:
            for r in chunk:
                cost.remove(r)
    return cost.total / cost.base_total


# the strict multiples are used when their floor leaves this much room below the target, so the plan
# is not forced to strip every wide group to its minimum to get there
STRICT_MARGIN = 0.05


def auto_multiples(analysis: Analysis, multiple: int, kind: str, target: float | None,
                   protected: set[int] | None = None) -> tuple[dict[int, int], str | None]:
    """Multiples for `--round-to auto`, the coarsest that can reach `target`: strict (see
    group_multiples) when their floor leaves STRICT_MARGIN of room, else halved for small groups,
    else 1 (a target is never missed for the sake of rounding). Returns them and a note saying which
    fallback was taken (None: strict)."""
    strict = group_multiples(analysis, multiple, halve=False)
    if target is None or floor_fraction(analysis, kind, strict, protected) <= target - STRICT_MARGIN:
        return strict, None
    halved = group_multiples(analysis, multiple, halve=True)
    if floor_fraction(analysis, kind, halved, protected) <= target:
        return halved, "halved for small groups to reach the target"
    return {g.id: 1 for g in analysis.groups}, "1: the table's multiples cannot reach the target"


def _multiple(round_to: int | Mapping[int, int], gid: int) -> int:
    return round_to.get(gid, 1) if isinstance(round_to, Mapping) else round_to


def _chunks(analysis: Analysis, scores: dict[int, float], protected: set[int], round_to: int | Mapping[int, int],
            normalize: bool) -> dict[int, list[list[int]]]:
    """Per group: removable classes, least important first, cut into round_to-sized chunks."""
    out: dict[int, list[list[int]]] = {}
    for g in analysis.groups:
        step = _multiple(round_to, g.id)
        free = [r for r in g.classes if not analysis.is_frozen(r) and r not in protected]
        if not free:
            continue
        n_fixed = g.size - len(free)
        min_keep = max(1, step) if n_fixed == 0 else 0
        ordered = sorted(free, key=lambda r: (scores.get(r, 0.0), r))
        removable = len(free) - max(0, min_keep - n_fixed)
        if removable <= 0:
            continue
        chunks = []
        first = g.size % step if step > 1 else 1
        pos = 0
        size = first or step
        while pos + size <= removable:
            chunks.append(ordered[pos:pos + size])
            pos += size
            size = step if step > 1 else 1
        if chunks:
            out[g.id] = chunks
    if normalize:
        for gid, chunks in out.items():
            vals = [scores.get(r, 0.0) for c in chunks for r in c]
            mean = sum(vals) / len(vals) if vals else 1.0
            if mean > 0:
                for c in chunks:
                    for r in c:
                        scores[r] = scores.get(r, 0.0) / mean
    return out


def _plan(analysis: Analysis, cost: IncrementalCost, removed: set[int], kind: str, target: float) -> Plan:
    kept = {}
    for g in analysis.groups:
        n = sum(1 for r in g.classes if r not in removed)
        kept[g.id] = (n, g.size)
    return Plan(frozenset(removed), kind, target, cost.base_total, cost.total, kept)


def allocate(
    analysis: Analysis,
    scores: dict[int, float],
    *,
    target: float,
    kind: str = "macs",
    strategy: str = "global",
    round_to: int | Mapping[int, int] = 1,
    protected: set[int] | None = None,
    tolerance: float = 0.002,
    allow_floor: bool = False,
    normalize: bool = True,
    cost_aware: bool = False,
    value_kind: str | None = "macs",
    time_kind: str | None = None,
    time_weight: float = 1.0,
) -> Plan:
    """Pick classes to remove so that cost(kind) <= target * original cost, as tightly as possible.

    A chunk whose removal would undershoot the target by more than `tolerance` (fraction of the
    original cost) is set aside while smaller chunks can still close the gap. With normalize (the
    default) each group's scores are divided by their mean so weight criteria of layers with different
    scales can be ranked together; scores that are already comparable across groups (measured
    sensitivity prices: damage per unit of cost) pass normalize=False, and then the chunk that finally
    closes the gap is the set-aside one of least damage (score x cost saved), not of least overshoot.
    `round_to` is one multiple for all groups or a multiple per group id (see group_multiples).

    time_kind (strategy "speed": a registered time estimate, passes.latency_cost.time_proxy_terms)
    multiplies each chunk's importance by (target cost saved / time saved)^time_weight, both as
    fractions of the model's total: a chunk saving 2% of the time for 1% of the MACs ranks as if half
    as important. The target and the stopping rule are unchanged, so the plan meets the same FLOPs
    target, spending it where it buys the most time.

    cost_aware=False removes the least important chunk first (cost only decides when to stop);
    cost_aware=True removes the chunk with the least value per unit of cost saved first, the greedy
    solution of the knapsack "keep the most value within the budget" (as in HALP). A chunk's value
    is its importance times the MACs it holds (`value_kind`; None: importance alone), so at equal
    importance a channel that does more work per millisecond is kept: used for latency targets,
    where a MAC costs very different time in different layers (depthwise, 1x1, early layers).

    A target below the floor (every prunable channel removed) is an error naming the floor, unless
    allow_floor: then the floor plan is returned and its `achieved` shows the miss.
    """
    if not 0 < target <= 1:
        raise GraphpruneError(f"target must be a fraction in (0, 1], got {target}")
    if any(m < 1 for m in (round_to.values() if isinstance(round_to, Mapping) else [round_to])):
        raise GraphpruneError(f"--round-to must be >= 1, got {round_to}")
    scores = dict(scores)
    chunks = _chunks(analysis, scores, protected or set(), round_to, normalize=normalize)
    cost = IncrementalCost(analysis, kind)
    goal = target * cost.base_total
    removed: set[int] = set()
    if cost.base_total <= 0:
        raise GraphpruneError(f"the model has no counted {kind} (no op the cost model counts): "
                              "nothing to reduce; see the uncounted ops in `graphprune inspect`")
    if cost.total <= goal:
        return _plan(analysis, cost, removed, kind, target)
    if not chunks:
        if allow_floor:
            return _plan(analysis, cost, removed, kind, target)
        raise GraphpruneError(f"target {kind} {target:g} is not reachable: no prunable channel groups (every channel "
                              "is frozen, protected or ignored), the floor is 1.000 of the original; "
                              "pass --allow-floor to accept the floor")
    next_chunk = {gid: 0 for gid in chunks}
    if strategy == "uniform":
        _uniform(analysis, chunks, cost, goal, removed, next_chunk)
    elif strategy not in ("global", "speed"):
        raise GraphpruneError(f"unknown strategy {strategy!r} (use {', '.join(STRATEGIES)}; "
                              "sensitivity needs calibration data)")
    work = IncrementalCost(analysis, value_kind) if cost_aware and value_kind else None
    clock = IncrementalCost(analysis, time_kind) if time_kind and not cost_aware else None
    for counter in (work, clock):
        if counter is not None:
            for r in removed:  # (uniform's bisection left these removed)
                counter.remove(r)

    def delta(counter: IncrementalCost, c: list[int]) -> float:
        before = counter.total
        for r in c:
            counter.remove(r)
        saved = (before - counter.total) / counter.base_total if counter.base_total else 0.0
        for r in c:
            counter.restore(r)
        return saved

    def priority(gid: int, i: int) -> float:
        c = chunks[gid][i]
        importance = sum(scores.get(r, 0.0) for r in c)
        if clock is not None:
            saved, time_saved = delta(cost, c), delta(clock, c)
            ratio = saved / time_saved if time_saved > 1e-15 else 1e6
            return importance / len(c) * ratio ** time_weight
        if not cost_aware:
            return importance / len(c)
        saved = delta(cost, c)
        value = importance / len(scores) * (delta(work, c) if work is not None else 1.0)
        return value / saved if saved > 1e-12 else float("inf")

    heap = [(priority(gid, i), gid, i) for gid, i in next_chunk.items() if i < len(chunks[gid])]
    heapq.heapify(heap)
    taken: list[tuple[float, int, int]] = []
    too_big: list[tuple[float, float, int, int, float]] = []  # (overshoot, score, gid, i, cost saved)
    slack = tolerance * cost.base_total
    while cost.total > goal:
        forced = not heap
        if forced:
            if not too_big:
                break
            # nothing small enough is left: take the chunk that overshoots least (with comparable
            # scores: the one whose removal costs least, score times cost saved)
            pick = min(too_big, key=(lambda c: (c[1] * c[4], c[0])) if not normalize else None)
            _, score, gid, i, _ = pick
            too_big.clear()
        else:
            score, gid, i = heapq.heappop(heap)
            if cost_aware or clock is not None:  # lazy greedy: savings change as neighbours go: re-check
                fresh = priority(gid, i)
                if heap and fresh > heap[0][0] * (1 + 1e-9):
                    heapq.heappush(heap, (fresh, gid, i))
                    continue
                score = fresh
        before = cost.total
        for r in chunks[gid][i]:
            cost.remove(r)
        if cost.total < goal - slack and (heap or (not normalize and not forced)):
            # this chunk would overshoot the target by more than the tolerance: set it aside
            too_big.append((goal - cost.total, score, gid, i, before - cost.total))
            for r in chunks[gid][i]:
                cost.restore(r)
            continue
        removed.update(chunks[gid][i])
        for counter in (work, clock):
            if counter is not None:
                for r in chunks[gid][i]:
                    counter.remove(r)
        taken.append((score, gid, i))
        if i + 1 < len(chunks[gid]):
            heapq.heappush(heap, (priority(gid, i + 1), gid, i + 1))
    _fill_back(chunks, taken, cost, goal, removed, round_to)
    if cost.total > goal * (1 + 1e-9) and not allow_floor:
        raise GraphpruneError(
            f"target {kind} {target:g} is not reachable: removing every prunable channel leaves "
            f"{cost.total / cost.base_total:.3f} of the original (the floor); pass --allow-floor to accept it"
        )
    return _plan(analysis, cost, removed, kind, target)


def _fill_back(chunks: dict[int, list[list[int]]], taken: list[tuple[float, int, int]], cost: IncrementalCost,
               goal: float, removed: set[int], round_to: int | Mapping[int, int]) -> None:
    """The last chunk can overshoot the target; give back the most important chunks that still fit."""
    last: dict[int, int] = {}
    for gid, cs in chunks.items():
        n = sum(1 for c in cs if c[0] in removed)
        if n:
            last[gid] = n - 1
    for _, gid, i in sorted(taken, reverse=True):
        # only a group's last removed chunk may come back: within a group removal stays in score order
        step = _multiple(round_to, gid)
        if last.get(gid) != i or (i == 0 and step > 1 and len(chunks[gid][0]) != step):
            continue  # (the remainder chunk is what keeps the group a multiple of round_to)
        chunk = chunks[gid][i]
        for r in chunk:
            cost.restore(r)
        if cost.total <= goal:
            removed.difference_update(chunk)
            last[gid] = i - 1
        else:
            for r in chunk:
                cost.remove(r)


def _uniform(analysis: Analysis, chunks: dict[int, list[list[int]]], cost: IncrementalCost, goal: float,
             removed: set[int], next_chunk: dict[int, int]) -> None:
    """Bisect the common kept fraction; leave the state just above the goal for global top-up."""

    def apply(frac: float) -> None:
        for r in list(removed):
            cost.restore(r)
        removed.clear()
        for gid, cs in chunks.items():
            total = analysis.groups[gid].size
            want = int(round((1 - frac) * total))
            n, i = 0, 0
            while i < len(cs) and n + len(cs[i]) <= want:
                for r in cs[i]:
                    cost.remove(r)
                    removed.add(r)
                n += len(cs[i])
                i += 1
            next_chunk[gid] = i

    lo, hi = 0.0, 1.0  # kept fraction: lo meets the goal (or is the floor), hi does not
    for _ in range(30):
        mid = (lo + hi) / 2
        apply(mid)
        if cost.total <= goal:
            lo = mid
        else:
            hi = mid
    apply(hi)


# Backends where `--round-to auto` keeps every group at the full multiple (auto_multiples): onnxruntime's
# NCHWc kernels pad a narrow group back up to the block, so pruning inside it buys nothing. On cuda-fp16
# narrow groups get the halved multiple (group_multiples(halve=True)): a regnet_y_800mf grouped conv kept
# whole at 16 channels per group by the strict rule measured slower on the GPU than the halved plan
# (benchmarks/results/rule_sweep_gpu_s3.json: regnet_y_800mf 1.38x vs 1.17x at batch 128).
STRICT_HARDWARE = ("ort-cpu",)


def resolve_round_to(analysis: Analysis, round_to: int | str, hardware: str, kind: str = "macs",
                     target: float | None = None, protected: set[int] | None = None) -> tuple[int | dict[int, int], dict]:
    """`round_to` as allocate() takes it, plus what the report says about it.

    "auto" looks the channel multiple for `hardware` up in the measured table
    (graphprune.backends.channel_table) and, on STRICT_HARDWARE, keeps every group at multiples of it;
    only when that cannot reach `target` are finer multiples used (auto_multiples). Elsewhere narrow
    groups get the halved multiple (group_multiples(halve=True)), 1 when even that cannot reach it.
    """
    if round_to == "auto":
        from graphprune.backends.channel_table import channel_multiple

        multiple = channel_multiple(hardware)
        if hardware in STRICT_HARDWARE:
            multiples, fallback = auto_multiples(analysis, multiple, kind, target, protected)
        else:
            multiples, fallback = group_multiples(analysis, multiple, halve=True), "halved for narrow groups"
            if target is not None and floor_fraction(analysis, kind, multiples, protected) > target:
                multiples, fallback = {g.id: 1 for g in analysis.groups}, "1: the table's multiples cannot reach the target"
        source = f"auto ({hardware} table{'; ' + fallback if fallback else ''})"
        return multiples, {"round_to": multiple, "round_to_source": source}
    try:
        value = int(round_to)
    except (TypeError, ValueError):
        raise GraphpruneError(f"--round-to must be a positive integer or 'auto', got {round_to!r}") from None
    if value < 1:
        raise GraphpruneError(f"--round-to must be >= 1, got {round_to}")
    return value, {"round_to": value, "round_to_source": "user"}
