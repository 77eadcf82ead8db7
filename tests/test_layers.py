"""The package's layers, held by a test: each module imports only modules of its own layer or below,
and no import cycle exists between modules (every import counts, the ones inside functions too; only
``if TYPE_CHECKING:`` blocks are left out, as they never run).

    model  <  lp  <  fluid  <  policies  <  sim (the engines)  <  metrics  <  api (jaxq.run)
           <  sweep, experiments, tune, benchmarks, testing, bandits, traces, the command line
"""

from __future__ import annotations

import ast
from pathlib import Path

import jaxq

ROOT = Path(jaxq.__file__).resolve().parent
LAYERS = [
    {"_types", "_progress"},
    {"model"},
    {"lp"},
    {"fluid"},
    {"policies"},
    {"sim"},
    {"metrics"},
    {"api"},
    {"sweep", "experiments", "tune", "benchmarks", "testing", "bandits", "traces", "cli", "__main__", "__init__"},
]


def module_of(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in ROOT.rglob("*.py")}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of {__name__}.LAYERS (add it)")


def _is_type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> set[str]:
    """The jaxq modules ``module`` imports (resolved: ``from . import x`` names the submodule x)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "jaxq")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] == "jaxq":
                for a in node.names:
                    out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer_and_imports_resolve():
    for module, targets in GRAPH.items():
        layer(module)
        for t in targets:
            assert t in MODULES, f"{module} imports {t}, which is not a module of jaxq"


def test_no_upward_import():
    bad = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
           for m, targets in sorted(GRAPH.items()) for t in sorted(targets) if layer(t) > layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    """Tarjan's strongly connected components: any with two modules or more is a cycle."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
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
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    assert not cycles, cycles


def test_one_module_shards():
    """One batching and sharding layer: ``shard_map`` appears in one module of the package."""
    users = sorted(m for m, p in MODULES.items() if "shard_map" in p.read_text())
    assert users == ["jaxq.sim.batch"], users
