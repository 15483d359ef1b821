"""The folders are the architecture: the library (edgekif/) knows nothing of the daemon
(service/) or the tools (tools/), and no two modules import each other. Checked on the
source (ast), so lazy imports inside functions count too; imports under `if TYPE_CHECKING:`
do not (they never run)."""

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
    """Absolute names of every module `path` imports (relative imports resolved)."""
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
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    names = {_module_name(p) for p in files}
    graph = {}
    for p in files:
        me = _module_name(p)
        graph[me] = {m for m in _imports(p) if m in names and m != me}
    return graph


def test_the_library_imports_neither_the_daemon_nor_the_tools():
    offenders = []
    for path in (REPO / "edgekif").rglob("*.py"):
        for name in _imports(path):
            if name.split(".")[0] in ("service", "tools"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert offenders == []


def test_no_two_modules_import_each_other():
    graph = _graph()
    # a package's __init__ is imported by its submodules anyway; count only real edges
    cycles = [f"{a} <-> {b}" for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, set())
              and not (b.startswith(a + ".") or a.startswith(b + "."))]
    assert cycles == []


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The import reader sees lazy imports and resolves relative ones (else the tests above
    would pass vacuously)."""
    pkg = tmp_path / "edgekif"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from service.daemon import run_daemon\n    from .b import g\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    assert _imports(pkg / "a.py") >= {"service.daemon", "edgekif.b", "edgekif.b.g"}


@pytest.mark.parametrize("path", ["edgekif/cli.py", "tools/bench_cl.py", *map(str, sorted(p.relative_to(REPO) for p in (REPO / "service").glob("*.py")))])
def test_only_the_continual_loop_builds_replay_samplers(path):
    """No caller draws from the replay buffer itself: edgekif.continual does it."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "sample"]
    assert calls == []
