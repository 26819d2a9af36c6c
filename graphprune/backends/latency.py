"""Latency statistics shared by every backend, so ORT and TVM numbers are directly comparable."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated single-inference timings, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean: float
    stdev: float
    runs: int
    iqr_pct: float = 0.0

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "LatencyStats":
        """Summarise raw per-run timings; p90 uses the nearest-rank method (no interpolation)."""
        if not samples_ms:
            raise ValueError("no latency samples")
        ordered = sorted(samples_ms)
        rank = max(0, min(len(ordered) - 1, -(-9 * len(ordered) // 10) - 1))
        median = statistics.median(ordered)
        q = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [median, median, median]
        return cls(
            median_ms=statistics.median(ordered),
            p90_ms=ordered[rank],
            mean=statistics.fmean(ordered),
            stdev=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            runs=len(ordered),
            iqr_pct=100.0 * (q[2] - q[0]) / median if median else 0.0,
        )

    @property
    def spread_pct(self) -> float:
        """Relative spread (stdev / median); iqr_pct is the outlier-robust one the noise warnings use."""
        return 100.0 * self.stdev / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "spread_pct": self.spread_pct}


def speedup(original: LatencyStats, pruned: LatencyStats) -> float:
    """Median-over-median speed-up (>1 means the pruned model is faster)."""
    return original.median_ms / pruned.median_ms if pruned.median_ms else float("inf")


def format_comparison(
    original: LatencyStats,
    pruned: LatencyStats,
    macs_original: int | None = None,
    macs_pruned: int | None = None,
) -> str:
    """One line putting the measured speed-up next to the MAC ratio it should be judged against."""
    line = (
        f"median {original.median_ms:.3f} -> {pruned.median_ms:.3f} ms "
        f"(p90 {original.p90_ms:.3f} -> {pruned.p90_ms:.3f}, spread "
        f"{original.spread_pct:.1f}%/{pruned.spread_pct:.1f}%): speed-up {speedup(original, pruned):.2f}x"
    )
    if macs_original and macs_pruned:
        line += f", MACs ratio {macs_original / macs_pruned:.2f}x ({macs_pruned / macs_original:.1%} of original)"
    return line
