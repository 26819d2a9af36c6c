"""A pruning plan: which channel classes go, and what that costs against the target.

It lives next to the analysis (not in the allocation pass that usually makes it) because every
stage after planning reads it: rewrite, recovery, validation and the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Plan:
    removed: frozenset[int]
    kind: str
    target: float
    base_cost: float
    cost: float
    kept: dict[int, tuple[int, int]] = field(default_factory=dict)  # group id -> (kept, total)

    @property
    def achieved(self) -> float:
        return self.cost / self.base_cost if self.base_cost else 1.0
