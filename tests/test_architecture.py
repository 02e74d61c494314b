"""The layout's rules, checked: module sizes, one-way imports, and torch-free policy code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "chameleon"
MAX_LINES = 500
HEAVY = ("torch", "transformers", "triton", "safetensors", "peft")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _runtime_imports(path: Path, package: str) -> set[str]:
    """chameleon modules imported at import time (not under TYPE_CHECKING, not inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else package
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return {m for m in found if m.startswith("chameleon")}


def test_no_module_is_over_500_lines() -> None:
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: {m for m in _runtime_imports(p, name.rsplit(".", 1)[0]) if m in modules and m != name}
             for name, p in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of concepts; submodules of a
    # package importing a sibling through the package are. Drop package -> own-submodule edges.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    seen: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in seen:
                dfs(nxt)
        stack.pop()
        seen[node] = 2

    for name in sorted(graph):
        if name not in seen:
            dfs(name)


@pytest.mark.parametrize("package", ["chameleon.sched", "chameleon.memory", "chameleon.sim", "chameleon.harness.workload",
                                     "chameleon.harness.metrics", "chameleon.engine.core"])
def test_policy_memory_and_simulator_code_imports_no_torch(package: str) -> None:
    names = [n for n in _modules() if n == package or n.startswith(package + ".")]
    code = (
        "import sys\n"
        + "".join(f"import {n}\n" for n in names)
        + f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {package} loaded {out}"
