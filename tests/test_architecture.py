"""The package's shape, checked from its source (AST): no import cycles among mtpbench's modules, no module
importing another's private (`_name`) definitions, thin CLI modules, and report/stats free of mlx.

These hold the layout of DESIGN.md in place: a new feature that needs a cycle or a private import to work is a
feature in the wrong place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mtpbench

ROOT = Path(mtpbench.__file__).parent
CLI_MAX_LINES = 250


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an `from X import ...` names."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(modules: dict[str, tuple[Path, ast.Module]]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)} for every import of an mtpbench module, at any depth
    (function-level imports too: a lazy import still couples two modules)."""
    found: dict[str, set[tuple[str, str | None]]] = {m: set() for m in modules}
    for name, (path, tree) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found[name] |= {(a.name, None) for a in node.names if a.name.startswith("mtpbench")}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path, node)
                if not target.startswith("mtpbench"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found[name].add((sub, None) if sub in modules else (target, a.name))
    return found


def _edges(modules) -> dict[str, set[str]]:
    """Module-level dependency graph; importing `pkg.mod` does not count as importing `pkg` (a package's
    __init__ runs, but a lazy __init__ re-exports nothing)."""
    return {m: {t for t, _ in deps if t in modules and t != m} for m, deps in _imports(modules).items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_mtpbench_modules():
    assert _cycles(_edges(_modules())) == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = sorted(f"{m} imports {t}.{n}" for m, deps in _imports(modules).items() for t, n in deps
                     if n and n.startswith("_") and not n.startswith("__") and t != m)
    assert private == []


def test_cli_modules_are_thin():
    """Each command module only parses, calls one library function and prints: short, no pandas or parquet."""
    modules = _modules()
    for name, (path, tree) in modules.items():
        if not name.startswith("mtpbench.cli"):
            continue
        assert len(path.read_text().splitlines()) <= CLI_MAX_LINES, name
        heavy = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        heavy |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not heavy & {"pandas", "pyarrow"}, name


def test_report_and_stats_never_import_mlx_or_the_decoder():
    modules = _modules()
    graph = _edges(modules)
    for name, (_, tree) in modules.items():
        if not name.startswith(("mtpbench.report", "mtpbench.stats")):
            continue
        third = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        third |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) if not n.level}
        assert not third & {"mlx", "mlx_lm"}, name
        assert not {t for t in graph[name] if t.startswith(("mtpbench.decode.speculative", "mtpbench.model"))}, name


def test_the_checks_see_a_cycle_and_a_private_import():
    """The walkers above are not vacuous: a planted cycle and private import are found."""
    a = ast.parse("from .b import _hidden\n")
    b = ast.parse("from . import a\n")
    modules = {"mtpbench.x.a": (ROOT / "x" / "a.py", a), "mtpbench.x.b": (ROOT / "x" / "b.py", b)}
    assert _cycles(_edges(modules)) == [["mtpbench.x.a", "mtpbench.x.b"]]
    assert ("mtpbench.x.b", "_hidden") in _imports(modules)["mtpbench.x.a"]
