"""The channel protocol the training/data-driven passes (DI, HFP, SSR, HBFP) are written against.

Why a protocol and not `Analysis` directly: the methods need three views of a channel class that
the analysis holds implicitly - its parameter slices (to regularise or mask filters), the feature
maps it lives on (to gate or observe activations) and a cost model that can be evaluated on
*soft* keep values (HFP's differentiable budget). `ChannelSpace` gathers those; it is built from
`graphprune.analyze(...)` (`from_analysis`) or by hand for tiny test models.

Cost model: a sum of terms `base * prod_t kept(t)` where `kept(t)` is the mean keep value of the
classes at tensor t's channel positions. With keep values in {0,1} this is exactly the analysis's
MACs/params count; with keep values in [0,1] it is multilinear (bilinear in cin/cout for a conv).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

ROLES = ("out", "in", "coupled")


@dataclass(frozen=True)
class Slice:
    """Axis `axis` of parameter `param` at positions `index` belongs to the class."""

    param: str
    axis: int
    index: tuple[int, ...]
    role: str  # "out" producer filters, "in" consumer columns, "coupled" BN/bias-like


@dataclass(frozen=True)
class GatePoint:
    """A module whose output (channel axis 1) carries `tensor`'s channels: where gates/observers hook."""

    module: str
    tensor: str


@dataclass
class ChannelSpace:
    classes: list[int]  # prunable class ids
    groups: list[list[int]]  # prunable classes touching the same tensors (min one kept per group)
    slices: dict[int, list[Slice]]
    roots: dict[str, np.ndarray]  # tensor -> class id at each channel position
    terms: dict[str, list[tuple[float, tuple[str, ...]]]]  # "macs"/"params" -> (base, tensors)
    gates: list[GatePoint] = field(default_factory=list)
    analysis: Any = None  # the graphprune Analysis it came from, if any

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.classes)}
        # position -> slot in a keep vector: prunable classes first, then one constant-1 slot
        self._slots = {
            t: torch.as_tensor(np.array([self.index.get(int(c), len(self.classes)) for c in r], dtype=np.int64))
            for t, r in self.roots.items()
        }
        self.group_of = {c: gi for gi, g in enumerate(self.groups) for c in g}

    # -- costs ----------------------------------------------------------------------------------
    def slots(self, tensor: str, device: Any = None) -> torch.Tensor:
        """Keep-vector slot of each channel position of `tensor` (on `device`, cached: a copy to a GPU
        at every training step would make the host wait for the device)."""
        if device is None or torch.device(device).type == "cpu":
            return self._slots[tensor]
        cache = self.__dict__.setdefault("_slot_cache", {})
        key = (tensor, str(device))
        if key not in cache:
            cache[key] = self._slots[tensor].to(device)
        return cache[key]

    def soft_cost(self, kind: str, keep: torch.Tensor) -> torch.Tensor:
        """Differentiable cost for keep values (one per class in `classes` order, any in [0,1])."""
        full = torch.cat([keep, keep.new_ones(1)])
        total = keep.new_zeros(())
        for base, tensors in self.terms[kind]:
            f = keep.new_tensor(float(base))
            for t in tensors:
                f = f * full[self.slots(t, keep.device)].mean()
            total = total + f
        return total

    def cost_np(self, kind: str, keep: np.ndarray) -> float:
        """soft_cost on a numpy keep vector (fast path for greedy searches)."""
        if not hasattr(self, "_np_slots"):
            self._np_slots = {t: s.numpy() for t, s in self._slots.items()}
        full = np.append(np.asarray(keep, dtype=np.float64), 1.0)
        total = 0.0
        for base, tensors in self.terms[kind]:
            f = float(base)
            for t in tensors:
                f *= full[self._np_slots[t]].mean()
            total += f
        return total

    def cost(self, kind: str, removed: Iterable[int] = ()) -> float:
        keep = np.ones(len(self.classes))
        for c in removed:
            if c in self.index:
                keep[self.index[c]] = 0.0
        return self.cost_np(kind, keep)

    def macs(self, removed: Iterable[int] = ()) -> float:
        return self.cost("macs", removed)

    def params(self, removed: Iterable[int] = ()) -> float:
        return self.cost("params", removed)

    def ratio(self, kind: str, removed: Iterable[int] = ()) -> float:
        return self.cost(kind, removed) / self.cost(kind)

    # -- parameter access -----------------------------------------------------------------------
    def out_l1(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per class (in `classes` order): the sum of the l1 norms of its "out" slices, differentiable.

        One reduction per parameter instead of one per class: HBFP evaluates this at every step,
        and a real network has thousands of classes."""
        if not hasattr(self, "_out_index"):
            rows: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
            for c in self.classes:
                for s in self.slices.get(c, []):
                    if s.role == "out":
                        pos, cls = rows.setdefault((s.param, s.axis), ([], []))
                        pos += list(s.index)
                        cls += [self.index[c]] * len(s.index)
            self._out_index = [(p, a, torch.as_tensor(pos), torch.as_tensor(cls)) for (p, a), (pos, cls) in rows.items()]
        dev = next(iter(params.values())).device if params else torch.device("cpu")
        cache = self.__dict__.setdefault("_out_index_on", {})
        if str(dev) not in cache:
            cache[str(dev)] = [(n, a, pos.to(dev), cls.to(dev)) for n, a, pos, cls in self._out_index]
        total = torch.zeros(len(self.classes), device=dev)
        for name, axis, pos, cls in cache[str(dev)]:
            if name not in params:
                continue
            p = params[name]
            per = p.abs().movedim(axis, 0).reshape(p.shape[axis], -1).sum(1)
            total = total.index_add(0, cls, per[pos].to(total.dtype))
        return total

    def class_rows(self, params: dict[str, torch.Tensor], cls: int, roles: tuple[str, ...] = ("out",)) -> list[torch.Tensor]:
        """The class's slices of the given roles, each flattened to (k, -1) rows (views, grads flow)."""
        out = []
        for s in self.slices.get(cls, []):
            if s.role in roles and s.param in params:
                p = params[s.param]
                rows = p.index_select(s.axis, torch.as_tensor(s.index, device=p.device))
                out.append(rows.movedim(s.axis, 0).reshape(len(s.index), -1))
        return out


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trained tensors under the names graphprune's analysis binds: an nn.Module's parameter
    names, or an ONNX graph's initializer names for graphprune's trainable ONNX module (`weights_by_name`)."""
    by_name = getattr(model, "weights_by_name", None)
    return by_name() if callable(by_name) else dict(model.named_parameters())


def _float_params(model: nn.Module) -> dict[str, torch.Tensor]:
    d = param_dict(model)
    if not callable(getattr(model, "weights_by_name", None)):
        d.update({k: v for k, v in model.named_buffers() if v.is_floating_point()})
    return d


def _module_of(model: nn.Module, param: str, modules: dict[str, nn.Module]) -> str | None:
    """The submodule owning parameter `param` (by name prefix, or the ONNX module's own map)."""
    owner = getattr(model, "module_of", None)
    name = owner(param) if callable(owner) else (param.rsplit(".", 1)[0] if "." in param else None)
    return name if name in modules else None


def from_analysis(analysis: Any, model: nn.Module | None = None) -> ChannelSpace:
    """ChannelSpace from a graphprune Analysis (PyTorch or ONNX); gates need the nn.Module's names."""
    prunable = [g for g in analysis.groups if not g.frozen]
    groups = [[c for c in g.classes if not analysis.is_frozen(c)] for g in prunable]
    groups = [g for g in groups if g]
    classes = [c for g in groups for c in g]
    want = set(classes)
    slices: dict[int, list[Slice]] = {c: [] for c in classes}
    for b in analysis.bindings:
        roots = analysis.roots[b.tensor]
        roots = roots[: len(roots) // b.divisor]
        for c in np.unique(roots).tolist():
            if c in want:
                idx = tuple(np.nonzero(roots == c)[0].tolist())
                slices[c].append(Slice(b.param, b.axis, idx, b.role))
    terms = {k: analysis.cost_terms(k) for k in ("macs", "params")}
    gates = _gate_points(analysis, model) if model is not None else []
    return ChannelSpace(classes, groups, slices, dict(analysis.roots), terms, gates, analysis)


def feature_tensors(analysis: Any) -> list[str]:
    """Tensors right after each producer (after its BatchNorm when one follows): the layer outputs."""
    graph = analysis.graph
    out: list[str] = []
    for b in analysis.bindings:
        if b.role != "out" or b.tensor not in analysis.roots:
            continue
        t = b.tensor
        cons = graph.consumers(t)
        if len(cons) == 1 and cons[0].op_type == "BatchNormalization" and cons[0].outputs[0] in analysis.roots:
            t = cons[0].outputs[0]
        if t not in out:
            out.append(t)
    return out


def _gate_points(analysis: Any, model: nn.Module) -> list[GatePoint]:
    graph = analysis.graph
    modules = dict(model.named_modules())
    points = []
    for t in feature_tensors(analysis):
        node = graph.producer(t)
        weight = node.inputs[1] if node is not None and len(node.inputs) > 1 else None
        name = _module_of(model, weight, modules) if weight else None
        if name is None:
            continue
        points.append(GatePoint(name, t))
    return points


def space_of(model: nn.Module, example_inputs: Any) -> ChannelSpace:
    """Analyse an nn.Module with graphprune and wrap it as a ChannelSpace."""
    from graphprune.frontends.fx_frontend import analyze_module

    return from_analysis(analyze_module(model, example_inputs), model)


# -- plans ----------------------------------------------------------------------------------------
class KeepCost:
    """`cost_np` of a 0/1 keep vector changed one class at a time, in O(terms) per change.

    Why: plan_from_scores checks the cost after every removal, and on a real network (PP-OCRv4 rec:
    ~5,000 classes) recomputing every tensor's mean each time takes seconds per plan. The kept count
    of a tensor is an integer, so count / size is exactly numpy's mean of the 0/1 values and the
    result equals `cost_np` bit for bit.
    """

    def __init__(self, space: ChannelSpace, kinds: Iterable[str]) -> None:
        self.space = space
        self.kinds = list(kinds)
        tensors = sorted({t for k in self.kinds for _, ts in space.terms[k] for t in ts})
        self.size = {t: len(space.slots(t)) for t in tensors}
        self.kept = {t: float(n) for t, n in self.size.items()}
        self.where: dict[int, list[tuple[str, int]]] = {}
        for t in tensors:
            ids, counts = np.unique(space.slots(t).numpy(), return_counts=True)
            for i, n in zip(ids.tolist(), counts.tolist()):
                if i < len(space.classes):
                    self.where.setdefault(space.classes[i], []).append((t, n))
        self.on = {c: True for c in space.classes}

    def set(self, cls: int, keep: bool) -> None:
        if self.on.get(cls, True) == keep:
            return
        self.on[cls] = keep
        for t, n in self.where.get(cls, []):
            self.kept[t] += n if keep else -n

    def cost(self, kind: str) -> float:
        total = 0.0
        for base, tensors in self.space.terms[kind]:
            f = float(base)
            for t in tensors:
                f *= self.kept[t] / self.size[t]
            total += f
        return total


def plan_from_scores(space: ChannelSpace, scores: dict[int, float], targets: dict[str, float],
                     min_keep: int = 1, min_keep_frac: float = 0.0) -> frozenset[int]:
    """Remove classes in increasing score order (per group at most size - min_keep) until every
    cost kind in `targets` (fraction kept, e.g. {"macs": 0.4}) is met; then give back the most
    important removed classes that still fit, so the plan lands just under the targets."""
    base = {k: space.cost(k) for k in targets}
    order = sorted(space.classes, key=lambda c: (scores.get(c, 0.0), c))
    left = {gi: len(g) for gi, g in enumerate(space.groups)}
    floor = {gi: max(min_keep, int(np.ceil(min_keep_frac * len(g)))) for gi, g in enumerate(space.groups)}
    keep = KeepCost(space, targets)
    removed: list[int] = []

    def met() -> bool:
        return all(keep.cost(k) <= targets[k] * base[k] * (1 + 1e-9) for k in targets)

    for c in order:
        if met():
            break
        gi = space.group_of[c]
        if left[gi] <= floor[gi]:
            continue
        left[gi] -= 1
        keep.set(c, False)
        removed.append(c)
    if not met():
        raise ValueError(f"targets {targets} are not reachable with min_keep={min_keep}, min_keep_frac={min_keep_frac}")
    for c in reversed(removed):  # most important first
        keep.set(c, True)
        if met():
            removed.remove(c)
        else:
            keep.set(c, False)
    return frozenset(removed)


class Masker:
    """Zero every parameter slice of removed classes, permanently (re-apply after optimizer steps).

    A masked model computes exactly what the physically pruned one does: removed producers emit
    zeros (filters, bias and BN affine are zero) and consumers ignore those columns.
    """

    def __init__(self, model: nn.Module, space: ChannelSpace, removed: Iterable[int]) -> None:
        params = _float_params(model)
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []
        per_param: dict[str, torch.Tensor] = {}
        for c in removed:
            for s in space.slices.get(c, []):
                if s.param not in params or s.param.endswith(("running_mean", "running_var")):
                    continue
                m = per_param.get(s.param)
                if m is None:  # built on the host: one copy per parameter, not one per slice, to a GPU
                    m = per_param[s.param] = torch.ones(params[s.param].shape, dtype=torch.bool)
                m.index_fill_(s.axis, torch.as_tensor(s.index), False)
        self.masks = [(params[n], m.to(params[n].device)) for n, m in per_param.items()]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for p, m in self.masks:
            p.mul_(m)


def channel_axis(analysis: Any, tensor: str) -> int:
    """The axis that carries `tensor`'s channels in the analysis (1 for NCHW, -1-like for
    channels-last or token layouts); 1 when there is no analysis to ask (hand-made spaces)."""
    ctx = getattr(analysis, "ctx", None)
    space = ctx.spaces.get(tensor) if ctx is not None else None
    return 1 if space is None or space.axis is None else int(space.axis)
