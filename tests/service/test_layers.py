"""Layers that import only downward.

rmt_core (the library) <- rmt_service (records, blobs, settings, the Celery contract) <- app, worker (the API and
the tuning worker, which know nothing of each other) <- rmt_cli (the umbrella `rmt` command). rmt_client talks
HTTP and imports none of them. Checked two ways: statically, on the import graph of every module (function-level
imports included, as they run sooner or later), and at run time for rmt_core with the service's packages made
unimportable.
"""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import rmt_core

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rmt_core", "rmt_service", "app", "worker", "rmt_client", "rmt_cli")
SERVICE_ONLY = ("fastapi", "starlette", "celery", "kombu", "redis", "sqlalchemy", "alembic", "psycopg",
                "uvicorn", "pydantic_settings", "prometheus_client", "app", "worker", "rmt_service", "rmt_cli",
                "rmt_client")
# Which of our packages each package may import (itself always).
MAY_IMPORT = {
    "rmt_core": set(),
    "rmt_client": set(),
    "rmt_service": {"rmt_core"},
    "app": {"rmt_core", "rmt_service"},
    "worker": {"rmt_core", "rmt_service"},
    "rmt_cli": {"rmt_core", "rmt_service", "app", "worker", "rmt_client"},
}


def module_files() -> dict[str, Path]:
    """Every module of our packages by dotted name (a package by its own name, for its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The names a module imports (ours resolved to the module, others as written) -> the first line that does;
    anywhere in the file, but not under `if TYPE_CHECKING:` (never run)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: dict[str, int] = {}

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.setdefault(full if full in modules else target, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(edges between our modules, every import) for every module of PACKAGES."""
    modules = module_files()
    everything = {name: imports_of(name, path, modules) for name, path in modules.items()}
    ours = {name: {target: line for target, line in imports.items() if target in modules and target != name}
            for name, imports in everything.items()}
    return ours, everything


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return cycles


def test_every_package_is_walked():
    ours, _ = import_graph()
    for name in ("rmt_cli.main", "rmt_cli.remote", "rmt_core.cli", "rmt_service.celery_app", "app.routers.export",
                 "worker.tasks", "rmt_client.client", "rmt_service.migrations.env"):
        assert name in ours


def test_no_import_cycles():
    ours, _ = import_graph()
    cycles = find_cycles(ours)
    described = ["; ".join(f"{a} -> {b} (line {ours[a][b]})" for a in cycle for b in cycle if b in ours[a])
                 for cycle in cycles]
    assert not cycles, "\n".join(described)


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_packages_import_only_downward():
    ours, _ = import_graph()
    wrong = [f"{source} imports {target} (line {line})" for source, targets in ours.items()
             for target, line in targets.items()
             if target.split(".")[0] != source.split(".")[0]
             and target.split(".")[0] not in MAY_IMPORT[source.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_routers_never_import_each_other():
    ours, _ = import_graph()
    wrong = [f"{source} imports {target}" for source, targets in ours.items() if source.startswith("app.routers.")
             for target in targets if target.startswith("app.routers")]
    assert not wrong, "\n".join(wrong)


def test_rmt_core_imports_nothing_of_the_service_anywhere_in_its_source():
    """Static, so a function-level import that the run-time check below never executes is caught too."""
    _, everything = import_graph()
    wrong = [f"{source} imports {target} (line {line})" for source, targets in everything.items()
             if source.split(".")[0] == "rmt_core"
             for target, line in targets.items() if target.split(".")[0] in SERVICE_ONLY]
    assert not wrong, "\n".join(wrong)


BLOCKER = f"""
import importlib.abc, sys
BLOCKED = {SERVICE_ONLY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is blocked: rmt_core must not need it')
sys.meta_path.insert(0, Block())
for name in BLOCKED:
    sys.modules.pop(name, None)
import importlib
for module in sys.argv[1:]:
    importlib.import_module(module)
leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
print('leaked', leaked)
sys.exit(1 if leaked else 0)
"""


def test_rmt_core_imports_without_the_service_stack():
    modules = sorted(f"rmt_core.{m.name}" for m in pkgutil.iter_modules(rmt_core.__path__))
    assert "rmt_core.pipeline" in modules and "rmt_core.runtime" in modules and "rmt_core.cli" in modules
    result = subprocess.run([sys.executable, "-c", BLOCKER, *modules], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_the_blocker_really_blocks():
    result = subprocess.run([sys.executable, "-c", BLOCKER, "rmt_service.store"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "blocked" in result.stderr


def _subcommands(parser) -> set[str]:
    return {name for action in parser._subparsers._group_actions for name in action.choices}


def test_the_library_cli_has_the_library_commands_and_rmt_has_them_all():
    """The service's entry points live above the service (rmt_cli), not in the library it is built on."""
    import tomllib

    from rmt_cli.main import build_parser as umbrella
    from rmt_core.cli import build_parser as library

    own = {"tune", "predict", "export", "info", "sample", "eval"}
    assert _subcommands(library()) == own
    assert _subcommands(umbrella()) == own | {"serve", "worker", "migrate", "remote"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["rmt"] == "rmt_cli.main:main"
    assert "rmt_cli*" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def test_rmt_runs_a_library_command_and_python_m_rmt_core_cli_still_does(tmp_path):
    for module in ("rmt_cli", "rmt_core.cli"):
        out = tmp_path / module
        run = subprocess.run([sys.executable, "-m", module, "sample", str(out), "--per-class", "1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert len([p for p in out.rglob("*") if p.is_file()]) >= 2
