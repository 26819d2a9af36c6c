"""Which importance/pruning method is which kind of pass, and how the API runs the one-shot ones.

* score criteria (l1, l2, bn_scale, fpgm, random; taylor for modules): scores -> allocation.
* data-driven plan search (di): calibration inputs + labels -> a plan meeting the target directly.
* training-based (hfp, ssr, hbfp): they change the weights while they search, so they run inside
  a training loop on an nn.Module (graphprune.passes.hfp / ssr / hbfp, docs/methods.md) and hand
  their plan to graphprune.prune(model, x, removed=plan).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphprune.analysis.groups import Analysis
from graphprune.errors import GraphpruneError

PLAN_METHODS = {"di"}
TRAINING_METHODS = {"hfp", "ssr", "hbfp"}
# the activation-aware criterion (passes/act_importance.py); needs calibration data
ACT_METHODS = {"act", "activation"}
# criteria that need an nn.Module (gradients through the real layers)
MODULE_METHODS = {"taylor"}


def methods_for(kind: str) -> list[str]:
    """Every method name prune() accepts for a model kind ("onnx" or "torch"), for errors and help."""
    from graphprune.passes.magnitude import CRITERIA

    names = {*CRITERIA, *PLAN_METHODS, "act"} | (MODULE_METHODS if kind == "torch" else set())
    return sorted(names)


def unknown_method_error(method: str, kind: str) -> GraphpruneError:
    what = "nn.Module" if kind == "torch" else "ONNX model"
    return GraphpruneError(f"unknown or unsupported method {method!r} for an {what}; choose from {methods_for(kind)}")


def check_method(method: str, kind: str) -> None:
    """Fail before any work on a method this model kind cannot run (training methods say where they run)."""
    if method in TRAINING_METHODS:
        raise training_method_error(method)
    if method not in methods_for(kind) and method not in ACT_METHODS:
        raise unknown_method_error(method, kind)


def training_method_error(method: str) -> GraphpruneError:
    return GraphpruneError(
        f"method {method} trains the model while it prunes: run graphprune.passes.{method} on an nn.Module "
        "with your data (docs/methods.md), then graphprune.prune(model, x, removed=plan)"
    )


def _calibration(options: dict[str, Any]) -> tuple[Any, np.ndarray]:
    calib = options.get("calib")
    if calib is None:
        raise GraphpruneError("method di needs calibration data: calib=(inputs, labels) or --calib data.npz (x, y)")
    if isinstance(calib, str):
        try:
            with np.load(calib) as data:
                return data["x"], data["y"]
        except (OSError, KeyError, ValueError) as exc:
            raise GraphpruneError(f"cannot read calibration file {calib}: needs arrays 'x' and 'y' ({exc})") from None
    x, y = calib
    return (x if isinstance(x, dict) else np.asarray(x)), np.asarray(y)


def di_plan(analysis: Analysis, target: float, kind: str, options: dict[str, Any],
            onnx_model: Any = None, module: Any = None, progress: Any = None) -> frozenset[int]:
    """Discriminant-information greedy search on feature statistics streamed from onnxruntime or
    the nn.Module (only layer outputs that carry prunable channels are observed)."""
    from graphprune.passes.channels import from_analysis
    from graphprune.passes.di import di_search, onnx_feature_stats, torch_feature_stats

    x, y = _calibration(options)
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        raise GraphpruneError(f"calibration labels y must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if len(y) != n:
        raise GraphpruneError(f"calibration data has {n} inputs but {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise GraphpruneError("method di needs labels of at least two classes in the calibration data")
    say = progress or (lambda _msg: None)
    space = from_analysis(analysis, module)
    if module is not None:
        import torch

        stats = torch_feature_stats(module, space, torch.as_tensor(x, dtype=torch.float32), y)
    else:
        stats = onnx_feature_stats(onnx_model, analysis, x, y, space.classes, say=say)
    try:
        plan = di_search(space, stats, target, kind=kind, rho=float(options.get("rho", 1e-2)), progress=say)
    except ValueError as exc:
        raise GraphpruneError(f"method di: {exc}") from None
    if analysis.cost(kind, plan) > target * analysis.cost(kind) * (1 + 1e-9):
        raise GraphpruneError(f"method di could not reach the {kind} target {target:g}")
    return plan


FALLBACK_WHY = {
    "bn_scale": ("l1", "no BatchNorm/InstanceNorm scale on these channels"),
    "di": ("none", "no layer output carrying these channels is observed: their DI loss counts as 0"),
}


def _own_classes(analysis: Analysis, method: str, module: Any = None) -> set[int] | None:
    """Classes the method scores by its own criterion (None: all of them)."""
    if method == "bn_scale":
        from graphprune.passes.magnitude import bn_scored_classes

        return bn_scored_classes(analysis)
    if method == "di":
        from graphprune.passes.channels import from_analysis
        from graphprune.passes.di import feature_maps

        if module is not None:
            names = [g.tensor for g in from_analysis(analysis, module).gates]
        else:
            names = feature_maps(analysis, [c for g in analysis.prunable_groups for c in g.classes])
        return {int(c) for t in names for c in np.unique(analysis.roots[t]).tolist()}
    return None


def method_coverage(analysis: Analysis, method: str, module: Any = None) -> dict[str, Any]:
    """Which prunable groups `method` scored itself and which fell back to what, and why.

    A group counts as scored when every prunable channel class in it is; the report shows this per
    group and `strict_method` turns any fallback into an error.
    """
    own = _own_classes(analysis, method, module)
    scored, fell = [], []
    for g in analysis.prunable_groups:
        classes = [c for c in g.classes if not analysis.is_frozen(c)]
        (scored if own is None or all(c in own for c in classes) else fell).append(g.id)
    fallbacks = []
    if fell:
        to, why = FALLBACK_WHY.get(method, ("l1", "not scorable by this method"))
        fallbacks.append({"to": to, "why": why, "groups": fell})
    return {"method": method, "scored_groups": scored, "fallbacks": fallbacks}


def check_strict(coverage: dict[str, Any]) -> None:
    """strict_method: a method that cannot score every prunable group is an error, not a fallback."""
    for fb in coverage["fallbacks"]:
        n = len(fb["groups"]) + len(coverage["scored_groups"])
        raise GraphpruneError(
            f"method {coverage['method']} cannot score {len(fb['groups'])} of {n} prunable groups "
            f"({fb['why']}; e.g. group {fb['groups'][0]}); without --strict-method they use {fb['to']}")
