"""One markdown table writer shared by the benchmark scripts and benchmarks/render_docs.py.

The docs' tables are regenerated from results files (render_docs.py), so every script that prints a
table for the docs formats it here: the same bars, rule and cell order everywhere.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def md_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Header, rule and rows; cells are str()-ed as given (format numbers before)."""
    lines = ["| " + " | ".join(str(c) for c in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
