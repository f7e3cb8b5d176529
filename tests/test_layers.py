"""The package layers: no import cycle between project modules, and no layer importing one
above it. Every ``import`` in every module counts, also those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.service_helpers import REPO

pytestmark = pytest.mark.unit

PACKAGES = ("augserver", "client")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: project_imports(path) & set(modules) - {name}
            for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycle(graph) is None


def test_each_layer_imports_only_below_itself(graph: dict[str, set[str]]) -> None:
    def imports(prefix: str) -> set[str]:
        return {t for m, targets in graph.items() if m.startswith(prefix) for t in targets}

    assert not {t for t in imports("augserver") if t.startswith("client")}, "server -> client"
    library = {m for m in graph if m.startswith("client") and not m.startswith(
        ("client.programs", "client.robustness"))}
    upward = {t for m in library for t in graph[m]
              if t.startswith(("client.programs", "client.robustness"))}
    assert not upward, f"the client library imports programs or the toolkit: {upward}"
    assert not {t for t in imports("client.robustness") if t.startswith("client.programs")}


def test_the_job_config_does_not_import_the_kernels() -> None:
    import subprocess
    import sys

    code = ("import sys, augserver.config; "
            "print(sorted(m for m in ('numba', 'augserver._kernels', 'torch', 'zmq') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
