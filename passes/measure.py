"""The measured speed-up every prune reports: its time budget, the record next to the FLOPs ratio, and
--min-speedup. How a model kind is timed lives in its adapter (ONNX: onnxruntime, interleaved)."""
from __future__ import annotations

import os
from typing import Any

from graphprune.analysis.groups import Analysis
from graphprune.analysis.plan import Plan
from graphprune.errors import GraphpruneError, SpeedupNotMet


def measure_budget_s(default: float) -> float:
    """Seconds the speed-up measurement may take (at least 5 interleaved rounds still run);
    GRAPHPRUNE_MEASURE_S overrides the default, e.g. to keep CI fast or to measure longer."""
    value = os.environ.get("GRAPHPRUNE_MEASURE_S")
    try:
        return max(0.0, float(value)) if value else default
    except ValueError:
        raise GraphpruneError(f"GRAPHPRUNE_MEASURE_S must be a number of seconds, got {value!r}") from None


def speedup_record(lat: dict[str, Any], analysis: Analysis, plan: Plan) -> dict[str, Any]:
    """The measurement next to what the cost model promised: the FLOPs speed-up, and for latency
    targets the predicted ratio (the measured one becomes the report's "achieved")."""
    macs0, macs1 = analysis.macs(), analysis.macs(plan.removed)
    ratio = macs1 / macs0 if macs0 else 1.0
    lat["flops_speedup"] = 1.0 / ratio if ratio else float("inf")
    if plan.kind == "latency":
        lat["predicted_ratio"] = plan.achieved
    return lat


def check_speedup(latency: dict[str, Any] | None, min_speedup: float | None) -> None:
    """--min-speedup: a measured speed-up below the floor is a failure, not a warning."""
    if min_speedup is None:
        return
    if latency is None:
        raise GraphpruneError("--min-speedup needs the latency measurement (drop --no-measure; "
                              "models with custom op domains cannot be measured)")
    if latency["speedup"] < min_speedup:
        raise SpeedupNotMet(f"measured speed-up {latency['speedup']:.2f}x is below --min-speedup {min_speedup:g}x "
                            f"({latency['before_ms']:.2f} -> {latency['after_ms']:.2f} ms on {latency['backend']}); "
                            "nothing written")
