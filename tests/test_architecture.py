"""The package's shape, checked from its source (AST): the wings of `WINGS` import only downward, no import
cycles among mtpbench's modules, no module importing another's private (`_name`) definitions, thin CLI modules,
and report/stats free of mlx.

The house, low to high (`WINGS` is the one list; a wing is a top-level package or a root module of mtpbench):
- errors, secrets, atomic, defaults, fmt, machine: shared pieces (one-line user errors, credential redaction,
  atomic writes, where bundled data lives, number formatting, the machine's state);
- sampling, oracle, model, provenance, decode: the one sampling transform, its independent check (numpy, no
  shared code), checkpoints and their forwards, where a number came from, the decoders (AR, speculative, the one
  acceptance rule, `limits`);
- builders: checkpoint and data builders (tiny, demo, quantize/graft, policies, the long-context file);
- sweep: the plan (axes, spec, endpoints, rows, store, prompts, long-context buckets), which backends, stats and
  the report read;
- backends, stats, report: what a sweep measures, the statistics on result tables, the HTML report and card;
- perf: what `mtpbench bench` measures and `mtpbench doctor` checks (cost terms and model, parity, roofline...);
- orchestrate: the runs that drive the wings below (the sweep runner and executors, verify, generate);
- cli, __main__, mtpbench: the command line, `python -m mtpbench`, the package's lazy facade (`mtpbench.load`).
Every import counts, function-level ones too (a lazy import still couples two wings): a feature that needs an
upward import, a cycle or a private import to work is a feature in the wrong place.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import mtpbench

ROOT = Path(mtpbench.__file__).parent
CLI_MAX_LINES = 250
PACKAGE = "mtpbench"  # the root package's own wing: its lazy facade (`mtpbench.load`, ...)
WINGS = ("errors", "secrets", "atomic", "defaults", "fmt", "machine", "sampling", "oracle", "model", "provenance", "decode",
         "builders", "sweep", "backends", "stats", "report", "perf", "orchestrate", "cli", "__main__", PACKAGE)


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


def _wing(module: str) -> str:
    """`mtpbench.sweep.spec` -> `sweep`, `mtpbench.fmt` -> `fmt`, `mtpbench` -> `mtpbench`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def _wing_edges(modules) -> dict[str, set[str]]:
    """Wing-level dependency graph: wing A -> wing B when any module of A imports any module of B."""
    graph: dict[str, set[str]] = {_wing(m): set() for m in modules}
    for m, targets in _edges(modules).items():
        graph[_wing(m)] |= {_wing(t) for t in targets} - {_wing(m)}
    return graph


def _upward(graph: dict[str, set[str]], order: tuple[str, ...]) -> list[str]:
    """Edges that point up `order` (or touch a wing it does not list)."""
    rank = {w: i for i, w in enumerate(order)}
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if a not in rank or b not in rank or rank[b] > rank[a])


def test_every_wing_has_a_place_in_the_order():
    wings = set(_wing_edges(_modules()))
    assert wings - set(WINGS) == set(), "place each new wing in WINGS (low to high)"
    assert len(set(WINGS)) == len(WINGS)


def test_the_docstring_lists_the_wings_in_their_order():
    """The house described above (each bullet's names before its colon) is `WINGS`, in the same order."""
    bullets = [line[2:].split(":")[0] for line in __doc__.splitlines() if line.startswith("- ")]
    assert tuple(w.strip() for b in bullets for w in b.split(",")) == WINGS


def test_wings_import_only_downward_and_form_no_cycle():
    graph = _wing_edges(_modules())
    assert _upward(graph, WINGS) == []
    assert _cycles(graph) == []


def test_the_wing_check_sees_a_cycle_that_module_level_checks_miss():
    """Two wings importing each other through different modules (one import inside a function): no module cycle,
    but a wing cycle, and the order check names the upward edge."""
    run = ast.parse("def go():\n    from ..b.y import f\n")
    low = ast.parse("from ..a.z import g\n")
    modules = {"mtpbench.a.x": (ROOT / "a" / "x.py", run), "mtpbench.a.z": (ROOT / "a" / "z.py", ast.parse("")),
               "mtpbench.b.y": (ROOT / "b" / "y.py", low)}
    assert _cycles(_edges(modules)) == []
    graph = _wing_edges(modules)
    assert _cycles(graph) == [["a", "b"]]
    assert _upward(graph, ("a", "b")) == ["a -> b"]
    assert _upward(graph, ("b", "a")) == ["b -> a"]
    assert _upward(graph, ("a",)) == ["a -> b", "b -> a"]


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


def _documented_names() -> list[str]:
    """The dotted names README's "usable without the CLI" paragraph documents (`mtpbench.x.y(...)`)."""
    readme = (ROOT.parent / "README.md").read_text()
    paragraph = readme[readme.index("The library is usable without the CLI"):].split("\n\n")[0]
    return re.findall(r"`(mtpbench(?:\.\w+)+)\(", paragraph)


def test_every_relative_import_stays_inside_the_package():
    """`from ..x import y` in a module one level below the root reaches past mtpbench: Python raises at run time
    (inside a function, only when that function runs), and the graph above would silently drop the edge."""
    beyond = [f"{name}: {'.' * node.level}{node.module or ''}" for name, (path, tree) in _modules().items()
              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
              and not _resolve(name, path, node).startswith(PACKAGE)]
    assert beyond == []


def _resolve_public(name: str) -> object:
    """`mtpbench.a.b.f` -> the object, through the packages' lazy re-exports (getattr), importing a submodule
    only where no attribute of that name exists."""
    parts = name.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[:i]))
    return obj


def test_every_public_name_the_readme_documents_resolves():
    names = _documented_names()
    assert {"mtpbench.load", "mtpbench.orchestrate.run_sweep", "mtpbench.orchestrate.run_verify"} <= set(names)
    for name in names:
        assert callable(_resolve_public(name)), name


def test_the_public_name_check_fails_on_a_stale_name():
    with pytest.raises(ModuleNotFoundError):
        _resolve_public("mtpbench.sweep.run.run_sweep")
    with pytest.raises(ModuleNotFoundError):
        _resolve_public("mtpbench.orchestrate.no_such_run")
