"""Layering: graphprune's modules import each other without cycles, and only upward in one direction
(ir <- analysis <- pipeline <- passes <- adapters <- api <- cli). Lazy imports inside functions count
too: a cycle hidden in a function body is still a cycle. Type-checking-only imports do not."""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"graphprune": os.path.join(ROOT, "graphprune"), "graphprune.passes": os.path.join(ROOT, "passes")}


def modules() -> dict[str, str]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for dirpath, _dirs, files in os.walk(folder):
            if "assets" in dirpath or "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, folder)
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    out[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: str, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    skip = {id(n) for t in ast.walk(tree) if _type_checking_only(t) for b in t.body for n in ast.walk(b)}
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, m, set(mods)) for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_imports_and_finds_cycles():
    graph = import_graph()
    assert "graphprune.api" in graph["graphprune.cli"]
    assert "graphprune.pipeline" in graph["graphprune.passes.stages"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_flow_one_way():
    """The CLI depends on the API, never the reverse; the core never imports the layers above it."""
    graph = import_graph()
    above = {
        "cli": lambda m: m.startswith("graphprune.cli") or m == "graphprune.__main__",
        "api": lambda m: m in ("graphprune.api", "graphprune.torch_prune", "graphprune"),
        "adapters": lambda m: m.startswith("graphprune.adapters"),
    }
    layer_of_core = ("graphprune.ir", "graphprune.analysis", "graphprune.pipeline", "graphprune.frontends",
                     "graphprune.rewrite", "graphprune.report", "graphprune.backends", "graphprune.passes")
    bad = []
    for mod, deps in graph.items():
        is_cli = above["cli"](mod)
        for dep in deps:
            if above["cli"](dep) and not is_cli:
                bad.append(f"{mod} -> {dep}")
            if mod.startswith(layer_of_core) and (above["api"](dep) or above["adapters"](dep)):
                bad.append(f"{mod} -> {dep}")
            if mod.startswith(("graphprune.ir", "graphprune.analysis", "graphprune.pipeline")) and \
                    dep.startswith(("graphprune.passes", "graphprune.report", "graphprune.backends")):
                bad.append(f"{mod} -> {dep}")
    assert bad == []
