"""The import graph of `sparsedit`, function-level imports counted: its cycles and its imports from a lower layer to a
higher one (ARCHITECTURE.md's layers: bottom modules, regions, ops, cache, nn, adapters, techniques, front).

    python tools/importgraph.py     # prints both; exit status 1 if there is either
"""

from __future__ import annotations

import ast
import pathlib
import sys


SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

LAYERS = [
    ["sparsedit.config", "sparsedit.attachments", "sparsedit.fingerprints", "sparsedit.stats", "sparsedit.metrics",
     "sparsedit.guard"],
    ["sparsedit.regions"],
    ["sparsedit.ops"],
    ["sparsedit.cache"],
    ["sparsedit.nn"],
    ["sparsedit.adapters", "sparsedit.models"],
    ["sparsedit.spatial", "sparsedit.calibration", "sparsedit.textedit", "sparsedit.temporal"],
    ["sparsedit.editors", "sparsedit.cli", "sparsedit.serve", "sparsedit.demo", "sparsedit.info", "sparsedit.pretrained",
     "sparsedit.testing", "sparsedit.data", "sparsedit.__main__"],
]  # fmt: skip


def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    out = {}
    for f in (SRC / "sparsedit").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def edges() -> dict[str, set[str]]:
    """Module → the sparsedit modules it imports, anywhere in its code."""
    mods = modules()
    out = {m: set() for m in mods}
    for m, (f, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    if not (node.module or "").startswith("sparsedit"):
                        continue
                    target = node.module
                else:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out[m].add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                out[m].update(a.name for a in node.names if a.name in mods)
    return {m: {t for t in ts if t in mods and t != m} for m, ts in out.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[0])):
                best = (p, i)
    return None if best is None else best[1]


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a module to one of a higher layer."""
    out = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = layer(m), layer(t)
            if a is not None and b is not None and b > a:
                out.append((m, t))
    return out


def main() -> int:
    graph = edges()
    found, up = cycles(graph), upward(graph)
    for c in found:
        print("cycle:", " -> ".join(c))
    for m, t in up:
        print(f"upward: {m} imports {t}")
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(found)} cycles, {len(up)} upward")
    return 1 if found or up else 0


if __name__ == "__main__":
    sys.exit(main())
