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


def write_results(path, report: dict, markdown) -> None:
    """Write a benchmark's results file (JSON) and print its table (`markdown(report)`)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


def replace_block(page: str, src: str, block: str, heading: str = "") -> str:
    """`page` with the results block of results file `src` replaced by `block` (which opens with its
    own `<!-- results: src ... -->` line and ends with `<!-- /results -->`), or with `heading` and the
    block appended when the page has none. The rest of the page is kept."""
    start = f"<!-- results: {src} "
    if start not in page:
        return page.rstrip("\n") + "\n\n" + (heading + "\n\n" if heading else "") + block + "\n"
    head, rest = page.split(start, 1)
    return head + block + rest.split("<!-- /results -->", 1)[1]
