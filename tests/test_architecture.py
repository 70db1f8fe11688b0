"""The package's layers: no import loops, and no module imports a layer above its own.

Every ``import`` counts, at the top of a module or inside a function: an import hidden in a
function is still a dependency. Layers, lowest first (docs/DESIGN.md explains each):

base -> data -> models -> compute -> stages -> bench -> plots -> apps
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mxmoe"

LAYERS = {
    "base": ["mxmoe.errors", "mxmoe.env", "mxmoe.files", "mxmoe.schemes", "mxmoe.plan", "mxmoe.paper"],
    "data": ["mxmoe.data", "mxmoe.tasks", "mxmoe.metrics", "mxmoe.zeroshot"],
    "models": ["mxmoe.models"],
    "compute": [
        "mxmoe.quant",
        "mxmoe.kernels",
        "mxmoe.routing",
        "mxmoe.sensitivity",
        "mxmoe.perfmodel",
        "mxmoe.allocate",
        "mxmoe.baselines",
        "mxmoe.packed",
        "mxmoe.checkpoint",
    ],
    "stages": ["mxmoe.profiles", "mxmoe.paths", "mxmoe.stages", "mxmoe.pipeline", "mxmoe.throughput"],
    "bench": ["mxmoe.bench"],
    "plots": ["mxmoe.plots"],
    "apps": [
        "mxmoe",
        "mxmoe.claims",
        "mxmoe.reproduce",
        "mxmoe.book",
        "mxmoe.book_check",
        "mxmoe.prewarm",
        "mxmoe.cli",
        "mxmoe.__main__",
    ],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    """mxmoe/a/b.py -> 'mxmoe.a.b'; a package's __init__.py -> the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict:
    """{module name: source path} of every module of the package."""
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path, modules: dict) -> set:
    """The mxmoe modules that ``path`` imports anywhere in its code (submodules named by ``from x import y``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mxmoe")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mxmoe") and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(modules)
            found |= subs or {node.module}
            if len(subs) < len(node.names):  # names that are not submodules come from the module itself
                found.add(node.module)
    return {m for m in found if m in modules}


def layer_of(module: str) -> str:
    """The layer of a module: the longest prefix listed in LAYERS."""
    best, layer = "", None
    for name, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, layer = p, name
    assert layer is not None, f"{module} belongs to no layer: add it to LAYERS (and docs/DESIGN.md)"
    return layer


def graph() -> dict:
    """{module: set of mxmoe modules it imports}, a package's __init__ importing its own submodules left out."""
    modules = all_modules()
    return {
        m: {d for d in imports(p, modules) if d != m and not (p.name == "__init__.py" and d.startswith(m + "."))}
        for m, p in modules.items()
    }


def cycles(g: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    assert cycles(graph()) == []


def test_no_upward_imports():
    upward = [
        f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
        for m, deps in sorted(graph().items())
        for d in sorted(deps)
        if d != "mxmoe" and ORDER.index(layer_of(d)) > ORDER.index(layer_of(m))
    ]
    assert upward == []


def test_compute_touches_no_results():
    """Compute modules never resolve the results tree: only stages, benchmarks, plots and apps do."""
    low = ("base", "data", "models", "compute")
    offenders = [
        m
        for m, p in all_modules().items()
        if layer_of(m) in low
        and any(word in p.read_text() for word in ("results_dir(", "mxmoe.paths", 'REPO_ROOT / "results"'))
    ]
    assert offenders == []


def test_the_checker_finds_loops_and_layers():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("mxmoe.stages.allocation") == "stages" and layer_of("mxmoe.models.zoo") == "models"
    assert ORDER.index(layer_of("mxmoe.paths")) > ORDER.index(layer_of("mxmoe.allocate"))
