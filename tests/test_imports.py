"""Every module of laser_rl imports, and the package's import graph has no cycle.

The graph is read statically (ast) from the sources: laser_rl/**/*.py plus kernels/src/, which installs as
laser_rl.kernels (pyproject's package-dir). An edge a -> b is any `import` of b in a, at module level or inside
a function: a lazy import hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = {"laser_rl": ROOT / "laser_rl", "laser_rl.kernels": ROOT / "kernels" / "src"}

def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> source file, for every module of the installed package."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if package == "laser_rl" and name.startswith("laser_rl.kernels"):
                continue  # not a folder of laser_rl/ (kernels/src/ is)
            modules[name] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, dict[str, tuple[int, bool]]]:
    """Module -> {imported laser_rl module: (line, lazy)}; imports under `if TYPE_CHECKING:` never run and are left out."""
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, tuple[int, bool]] = {}

        def visit(node: ast.AST, lazy: bool) -> None:
            if _type_checking_only(node):
                return
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module name: its module
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):  # a parent package is always imported first
                    edges.setdefault(target, (node.lineno, lazy))
            inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit(child, inner)

        visit(ast.parse(path.read_text(), filename=str(path)), False)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. every import cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _describe(component: frozenset[str], graph) -> str:
    return "; ".join(
        f"{a} -> {b} (line {line}{', lazy' if lazy else ''})" for a in sorted(component) for b, (line, lazy) in sorted(graph[a].items()) if b in component
    )


MODULES = module_files()
GRAPH = import_graph(MODULES)


def test_the_graph_reader_sees_real_edges_and_cycles():
    # Edges the package certainly has, read the way the test reads every module.
    assert "laser_rl.lm" in GRAPH["laser_rl.iterative_dpo"] and "laser_rl.feedback" in GRAPH["laser_rl.iterative_dpo"]
    assert GRAPH["laser_rl.lm"] == {}  # the model plumbing depends on nothing else in the package
    assert cycles({"a": {"b": (1, False)}, "b": {"c": (1, True)}, "c": {"a": (1, False)}, "d": {"a": (1, False)}}) == [frozenset("abc")]


def test_module_level_imports_have_no_cycle():
    eager = {m: {t: e for t, e in edges.items() if not e[1]} for m, edges in GRAPH.items()}
    found = cycles(eager)
    assert not found, "import cycles at module level: " + " | ".join(_describe(c, GRAPH) for c in found)


def test_no_cycle_through_lazy_imports_either():
    found = cycles(GRAPH)
    assert not found, "import cycles (lazy imports included): " + " | ".join(_describe(c, GRAPH) for c in found)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    try:
        importlib.import_module(module)
    except ImportError as e:  # a missing third-party package skips; a broken import inside laser_rl fails
        if not e.name or e.name.startswith("laser_rl"):
            raise
        pytest.skip(f"{module} needs the optional package {e.name!r}, not installed here: {e}")
    except RuntimeError as e:  # the demo names a missing optional package in its own error type
        if type(e).__name__ != "MissingAssetError":
            raise
        pytest.skip(f"{module} needs an optional dependency: {e}")
