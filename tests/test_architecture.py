"""The house's rules that import-linter does not check (``lint-imports`` checks the layers).

- no private name (leading underscore) imported from another module of the package (a
  package's private submodules, e.g. ``sample_data/_images.py``, may be imported inside that
  package: import-linter's ``private_modules`` contract keeps them there);
- no function-level import of the package's own modules, except in the CLI (whose commands
  import their engine lazily, so ``mmfl --help`` starts fast): a function-level import is how a
  cycle hides;
- no function in ``multimodal_fl/`` over 100 lines of code (``scripts/function_sizes.py``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "multimodal_fl"
#: Modules whose functions may import the package lazily, and why.
LAZY_ALLOWED = {
    "multimodal_fl.cli": "each command imports only what it runs (start-up time)",
}


def _modules() -> dict[str, tuple[str, bool]]:
    """Module name -> (source, is a package ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path.read_text(), is_package)
    return out


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(module: str, source: str, is_package: bool, known: set[str]) -> list[str]:
    """``from multimodal_fl.x import _name`` lines of one module, private submodules aside."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        origin = _absolute(node, module, is_package)
        if not origin.startswith("multimodal_fl"):
            continue
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            if f"{origin}.{name}" in known and module.startswith(origin + "."):
                continue  # a private submodule, imported inside its own package
            found.append(f"{module}:{node.lineno} imports {origin}.{name}")
    return found


def function_level_imports(module: str, source: str, is_package: bool) -> list[str]:
    """Imports of ``multimodal_fl`` inside a function body of one module."""
    found = set()
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(func):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                names = [_absolute(node, module, is_package)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("multimodal_fl") for n in names):
                found.add(f"{module}:{node.lineno} in {func.name}()")
    return sorted(found)


def test_no_private_name_crosses_modules() -> None:
    modules = _modules()
    found = [line for name, (src, pkg) in modules.items()
             for line in private_imports(name, src, pkg, set(modules))]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_no_function_level_import_of_the_package() -> None:
    found = [line for name, (src, pkg) in _modules().items() if name not in LAZY_ALLOWED
             for line in function_level_imports(name, src, pkg)]
    assert not found, "function-level imports of the package:\n" + "\n".join(found)


def test_functions_are_sized_to_be_read() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from function_sizes import function_sizes
    finally:
        sys.path.pop(0)
    over = [f"{name} ({n} lines of code)" for path in sorted(PACKAGE.rglob("*.py"))
            for n, name, _ in function_sizes(path) if n > 100]
    assert not over, "functions over 100 lines of code:\n" + "\n".join(over)


def test_the_scanners_find_planted_violations() -> None:
    known = {"multimodal_fl.data", "multimodal_fl.data.fhir", "multimodal_fl.sample_data",
             "multimodal_fl.sample_data._images"}
    assert private_imports("multimodal_fl.data.text",
                           "from multimodal_fl.data.fhir import _secret\n", False, known)
    assert private_imports("multimodal_fl.data.text", "from .fhir import _secret\n", False, known)
    assert not private_imports("multimodal_fl.sample_data._write",
                               "from multimodal_fl.sample_data import _images\n", False, known)
    assert private_imports("multimodal_fl.engines.x",
                           "from multimodal_fl.sample_data import _images\n", False, known)
    assert function_level_imports("multimodal_fl.x",
                                  "def f():\n    from multimodal_fl import engines\n", False)
    assert function_level_imports("multimodal_fl.x",
                                  "def f():\n    import multimodal_fl.engines\n", False)
    assert not function_level_imports("multimodal_fl.x", "def f():\n    import json\n", False)


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_the_module_graph_has_no_cycle() -> None:
    """Every import counts: module level, function level and TYPE_CHECKING alike (grimp)."""
    import grimp

    graph = grimp.build_graph("multimodal_fl")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert not import_cycles(edges)
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
