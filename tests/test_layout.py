"""What keeps the code readable as it grows: small modules and functions, and backend names only where
a backend is described (its record, its templates, its own runtime module, the tests)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from builder import backends

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "builder"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def test_no_module_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"split these modules (over {MAX_MODULE_LINES} lines): {long}"


def test_no_function_over_80_lines():
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = lines
    assert not long, f"split these functions (over {MAX_FUNCTION_LINES} lines): {long}"


def _a_backends_runtime_module(path: Path) -> bool:
    """Under builder/runtime/, a module (or package) some backend's image ships as its own (its record's
    `runtime_modules`): there a quoted name is that server's vocabulary (Xinference's "vllm" engine)."""
    runtime = PACKAGE / "runtime"
    if runtime not in path.parents:
        return False
    top = path.relative_to(runtime).parts[0]
    return any(top == module for b in backends.REGISTRY.values() for module in b.runtime_modules)


def test_backend_names_appear_only_where_a_backend_is_described():
    """A quoted backend name ("xinference", 'llamacpp') in code outside the registry package, the
    templates, a backend's own runtime module and the tests is a branch on a name: move the decision
    into the backend's record."""
    quoted = re.compile(r"""(?<![\w.-])(["'])({})\1""".format("|".join(map(re.escape, backends.NAMES))))
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        if (PACKAGE / "backends") in path.parents or _a_backends_runtime_module(path):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if quoted.search(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)
