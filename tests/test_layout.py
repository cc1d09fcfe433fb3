"""The shape of the code, held by a test (issue 19): sizes, import direction, no cycles, no torch at the door.

In-process and cheap: the rules are read from the source with ``ast``; the torch rule is checked by
importing the transport in a fresh interpreter and looking at ``sys.modules``. Each rule also has a
test showing that it catches a planted violation, so a checker that silently passes everything fails.

The rules (docs/ARCHITECTURE.md draws the rooms they protect):
- no file in ``sidecar/`` over 400 lines, no function over 100;
- no import cycle between sidecar modules, lazy (function-level) imports included — a lazy import
  that only dodges a cycle is still a cycle;
- imports point down: the layers below never import the ones above (see ``FORBIDDEN``);
- the transport, the schemas and the job bookkeeping import neither torch nor transformers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sidecar"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 100

# module prefix -> prefixes it must never import (directly or lazily)
ABOVE_ENGINE = ("sidecar.server", "sidecar.rpc", "sidecar.app", "sidecar.methods", "sidecar.cli",
                "sidecar.demo", "sidecar.compat", "sidecar.client", "sidecar.drain", "sidecar.jobs")
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "sidecar.wire": ("sidecar.",),  # the schemas stand alone (errors aside, see ALLOWED_BELOW)
    "sidecar.errors": ("sidecar.",),
    "sidecar.files": ("sidecar.",),
    "sidecar.procs": ("sidecar.",),
    "sidecar.paths": ("sidecar.",),
    "sidecar.stdio": ("sidecar.",),
    "sidecar.training": ABOVE_ENGINE,
    "sidecar.adapters": ABOVE_ENGINE + ("sidecar.training.recipe",),
    "sidecar.models": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.generate"),
    "sidecar.data": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models"),
    "sidecar.datasets": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models", "sidecar.chat",
                                        "sidecar.batching"),
    "sidecar.chat": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models",
                                    "sidecar.batching"),
    "sidecar.batching": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models"),
    "sidecar.generate": ABOVE_ENGINE + ("sidecar.training",),
    "sidecar.journal": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models"),
    "sidecar.jobdir": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models",
                                      "sidecar.journal"),
    "sidecar.compat_events": ABOVE_ENGINE + ("sidecar.training", "sidecar.adapters", "sidecar.models"),
    "sidecar.rpc": ("sidecar.server", "sidecar.app", "sidecar.methods", "sidecar.cli"),
    "sidecar.methods": ("sidecar.server", "sidecar.cli"),
    "sidecar.app": ("sidecar.server", "sidecar.methods", "sidecar.cli"),
}
ALLOWED_BELOW = {"sidecar.wire": ("sidecar.wire",), "sidecar.stdio": ("sidecar.stdio",),
                 "sidecar.errors": ("sidecar.errors",), "sidecar.paths": ("sidecar.files",)}
NO_TORCH_AT_IMPORT = ["sidecar.wire", "sidecar.errors", "sidecar.stdio", "sidecar.rpc", "sidecar.server",
                      "sidecar.app", "sidecar.methods", "sidecar.jobs", "sidecar.journal", "sidecar.jobdir",
                      "sidecar.procs", "sidecar.files", "sidecar.paths", "sidecar.housekeeping",
                      "sidecar.drain", "sidecar.datasets", "sidecar.chat", "sidecar.batching",
                      "sidecar.training.checks", "sidecar.training.distributed", "sidecar.adapters.package",
                      "sidecar.compat_events"]
HEAVY = ("torch", "transformers", "peft")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every sidecar module ``source`` imports, at any depth of the file (lazy imports included)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {name for name in found if name in known}


def read_tree(package: Path = PACKAGE, root: Path = ROOT) -> dict[str, tuple[Path, str]]:
    return {module_name(p, root): (p, p.read_text()) for p in sorted(package.rglob("*.py"))}


def import_graph(tree: dict[str, tuple[Path, str]]) -> dict[str, set[str]]:
    known = set(tree)
    return {name: imports_of(src, name, path.name == "__init__.py", known) - {name}
            for name, (path, src) in tree.items()}


def size_violations(tree: dict[str, tuple[Path, str]]) -> list[str]:
    found = []
    for name, (path, src) in tree.items():
        lines = src.count("\n")
        if lines > MAX_FILE_LINES:
            found.append(f"{name}: {lines} lines (limit {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}.{node.name} (line {node.lineno}): {length} lines "
                                 f"(limit {MAX_FUNCTION_LINES})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in graph.items():
        for owner, banned in FORBIDDEN.items():
            if not _under(module, owner):
                continue
            allowed = ALLOWED_BELOW.get(owner, ()) + ("sidecar.errors",) * (owner not in ("sidecar.errors",
                                                                                         "sidecar.stdio"))
            for target in sorted(targets):
                if any(_under(target, b) for b in banned) and not any(_under(target, a) for a in allowed):
                    found.append(f"{module} imports {target} (a layer {owner} must not reach)")
    return found


# -----------------------------------------------------------------------------------------------
# The rules, on the real tree
# -----------------------------------------------------------------------------------------------

def test_no_file_over_400_lines_and_no_function_over_100():
    assert size_violations(read_tree()) == []


def test_no_import_cycles_lazy_imports_included():
    assert cycles(import_graph(read_tree())) == []


def test_imports_point_down():
    assert layer_violations(import_graph(read_tree())) == []


def test_the_door_imports_no_torch():
    present = [m for m in NO_TORCH_AT_IMPORT if (PACKAGE / (m.split(".", 1)[1].replace(".", "/") + ".py")).exists()
               or (PACKAGE / m.split(".", 1)[1].replace(".", "/") / "__init__.py").exists()]
    code = ("import importlib, sys\n"
            f"for m in {present!r}: importlib.import_module(m)\n"
            f"print(','.join(sorted(h for h in {HEAVY!r} if h in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {present} pulled in {out.stdout.strip()}"


# -----------------------------------------------------------------------------------------------
# Each checker catches a planted violation (a checker that passes everything fails here)
# -----------------------------------------------------------------------------------------------

def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[Path, str]]:
    for rel, text in files.items():
        p = tmp_path / "sidecar" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return read_tree(tmp_path / "sidecar", tmp_path)


def test_planted_oversize_is_caught(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(101))
    tree = _plant(tmp_path, {"__init__.py": "", "big.py": "\n" * 401, "long.py": f"def f():\n{body}\n"})
    found = size_violations(tree)
    assert any(v.startswith("sidecar.big: 401 lines") for v in found), found
    assert any(v.startswith("sidecar.long.f") for v in found), found


def test_planted_lazy_cycle_is_caught(tmp_path):
    tree = _plant(tmp_path, {"__init__.py": "", "journal.py": "def f():\n    from .training import checkpoint\n",
                             "training/__init__.py": "",
                             "training/checkpoint.py": "from ..journal import f\n"})
    assert cycles(import_graph(tree)) == [["sidecar.journal", "sidecar.training.checkpoint"]]


def test_planted_upward_import_is_caught(tmp_path):
    tree = _plant(tmp_path, {"__init__.py": "", "server.py": "", "wire/__init__.py": "from .base import X\n",
                             "wire/base.py": "X = 1\n", "training/__init__.py": "",
                             "training/loop.py": "from .. import server\nfrom ..wire import base\n"})
    assert layer_violations(import_graph(tree)) == [
        "sidecar.training.loop imports sidecar.server (a layer sidecar.training must not reach)"]
