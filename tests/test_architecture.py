"""The folders are the architecture: the library (edgekif/) knows nothing of the daemon
(service/) or the tools (tools/), and no modules import each other in a circle of any length.
Checked on the source (ast), so lazy imports inside functions count too; imports under
`if TYPE_CHECKING:` do not (they never run).

The import graph, as Python runs it:
  * `from pkg import name` is an edge to the module `pkg.name` when that is a module, else
    to `pkg` (a name its `__init__` defines).
  * Importing `a.b.c` runs `a.b`'s `__init__` first, so it is an edge to `a.b` as well:
    a package cannot be entered by a side door.
  * `importlib.import_module(name, __name__)` with a computed name (a registry loading its
    entries by name) may load any submodule of that package: an edge to each of them.
  * A module's import of its own enclosing package (`from . import TASK` in a submodule, or
    the parent import Python does anyway) is not an edge. Python has already started that
    package before the submodule's first line runs, so such an import orders nothing; a
    package and its submodules are one unit, and the `__init__` is its front door. What is
    checked is that no *other* module is both behind and in front of a module: e.g. if
    `edgekif.config` imports anything in `edgekif.strategies`, that package's `__init__`
    runs and can load every strategy, so no strategy may import `edgekif.config`.
A circle is a strongly connected component of that graph with more than one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edgekif", "service")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Absolute names `path` imports (relative imports resolved): for `from pkg import x`
    both `pkg` and `pkg.x` (either may be the module); `pkg.*` for a computed
    `importlib.import_module(..., __name__)`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            # `from . import x` may name a submodule
            out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node):
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                out.add(name.value if not name.value.startswith(".") else f"{package}{name.value}")
            else:
                out.add(f"{package}.*")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


def _is_import_module(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name == "import_module" and bool(node.args)


def _graph(packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules it imports, with the rules in this file's docstring."""
    files = [p for pkg in packages for p in (REPO / pkg).rglob("*.py")]
    names = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        me = _module_name(p)
        deps: set[str] = set()
        for name in _imports(p):
            if name.endswith(".*"):  # computed import_module: any submodule of the package
                deps |= {m for m in names if m.startswith(name[:-1])}
                continue
            while name and name not in names:  # `from pkg import func`: the edge is to pkg
                name = name.rpartition(".")[0]
            parts = name.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # parents run first
        # a module's own enclosing packages are not edges (see the docstring)
        graph[me] = {m for m in deps if m in names and m != me and not me.startswith(m + ".")}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def test_the_library_imports_neither_the_daemon_nor_the_tools():
    offenders = []
    for path in (REPO / "edgekif").rglob("*.py"):
        for name in _imports(path):
            if name.split(".")[0] in ("service", "tools"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert offenders == []


def test_no_circle_of_any_length():
    circles = ["a circle through " + ", ".join(c) for c in _circles(_graph())]
    assert circles == [], "\n".join(circles)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The import reader sees lazy imports and resolves relative ones (else the tests above
    would pass vacuously)."""
    pkg = tmp_path / "edgekif"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from service.daemon import run_daemon\n    from .b import g\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert _imports(pkg / "a.py") >= {"service.daemon", "edgekif.b", "edgekif.b.g"}


def test_the_cycle_finder_can_fail(tmp_path, monkeypatch):
    """A planted circle of three files is found, through a lazy import and a package's
    `__init__`; a submodule importing its own package is not a circle."""
    pkg = tmp_path / "edgekif"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.c import h\n")  # enters edgekif.sub by its __init__
    (pkg / "b.py").write_text("def g():\n    from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("X = 1\ndef load(n):\n    import importlib\n    return importlib.import_module(n, __name__)\n")
    (pkg / "sub" / "c.py").write_text("from . import X\nh = X\n")
    (pkg / "sub" / "d.py").write_text("from edgekif.b import g\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    graph = _graph(("edgekif",))
    assert "edgekif.sub" not in graph["edgekif.sub.c"]  # its own package: no edge
    assert _circles(graph) == [["edgekif.a", "edgekif.b", "edgekif.sub", "edgekif.sub.d"]]
    (pkg / "sub" / "d.py").write_text("")
    assert _circles(_graph(("edgekif",))) == []


@pytest.mark.parametrize("path", ["edgekif/cli.py", "tools/bench_cl.py", *map(str, sorted(p.relative_to(REPO) for p in (REPO / "service").glob("*.py")))])
def test_only_the_continual_loop_builds_replay_samplers(path):
    """No caller draws from the replay buffer itself: edgekif.continual does it."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "sample"]
    assert calls == []


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _top_level_names(path: Path) -> set[str] | None:
    """The names a module defines when it runs (defs, classes, assignments, imports), also
    under top-level `if`/`try`, not under `if TYPE_CHECKING:` (never run); None when it has a
    module `__getattr__` (any name may exist)."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    out.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update((a.asname or a.name).split(".")[0] for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)
    return None if "__getattr__" in out else out


def _missing_imported_names(root: Path, folders: tuple[str, ...]) -> list[str]:
    """`from ours import name` (anywhere in a file, lazy imports too) where `ours` is one of
    PACKAGES and neither `ours.name` is a module nor `ours` defines `name`."""
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts)
            package = module.rpartition(".")[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                if not isinstance(node, ast.ImportFrom):
                    continue
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] not in PACKAGES:
                    continue
                source = _module_file(target, root)
                if source is None:
                    out.append(f"{path.relative_to(root)}:{node.lineno}: no module {target}")
                    continue
                defined = _top_level_names(source)
                for a in node.names:
                    if a.name != "*" and defined is not None and a.name not in defined and _module_file(f"{target}.{a.name}", root) is None:
                        out.append(f"{path.relative_to(root)}:{node.lineno}: {target} has no {a.name}")
    return out


def test_every_imported_name_exists():
    """A name imported from the library or the daemon exists there, in tools and tests too,
    whose lazy imports no other test may run (bench_eval_dtype imported compute_dtype from
    edgekif.evaluate for weeks after it had moved to edgekif.compute)."""
    assert _missing_imported_names(REPO, (*PACKAGES, "tools", "tests")) == []


def test_a_moved_name_is_found(tmp_path):
    (tmp_path / "edgekif").mkdir()
    (tmp_path / "edgekif" / "__init__.py").write_text("")
    (tmp_path / "edgekif" / "a.py").write_text("import os\nif os.sep:\n    X = 1\nelse:\n    from .b import Y\ndef f():\n    Z = 2\n"
                                              "if TYPE_CHECKING:\n    from os import T\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text("def main():\n    from edgekif.a import X, Y, os, Z, T\n    from edgekif import a, c\n    from edgekif.nope import W\n")
    assert _missing_imported_names(tmp_path, ("edgekif", "tools")) == [
        "edgekif/a.py:5: no module edgekif.b",
        "tools/t.py:2: edgekif.a has no Z",
        "tools/t.py:2: edgekif.a has no T",
        "tools/t.py:3: edgekif has no c",
        "tools/t.py:4: no module edgekif.nope",
    ]
