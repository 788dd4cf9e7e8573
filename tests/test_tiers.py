"""The package's tiers stay apart: runtime code (what ships in images) never reaches into the image,
model or demo tiers, each runtime image carries only what it runs, and the chatglm.cpp runtime's
requirements list exactly what it imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builder.image.render import render_text
from builder.spec import BuildSpec

PACKAGE = Path(__file__).resolve().parents[1] / "builder"
RUNTIME = PACKAGE / "runtime"
STDLIB = set(sys.stdlib_module_names)


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


# -- the import picture ---------------------------------------------------------------------------
# Tiers, lowest first: a module imports its own tier and those below, never one above. `builder` and
# builder.files ship in every image beside runtime; builder.errors (what a user can fix) serves the build
# stage and the host; model is the build stage; spec (with the backend registry and selection) decides;
# image renders and drives Docker; demo runs the whole pipeline; the CLI sits on top, and the
# reference pages' generator reads them all.
TIERS = (
    ("base", ("builder", "builder.files")),
    ("runtime", ("builder.runtime",)),
    ("errors", ("builder.errors",)),
    ("model", ("builder.model",)),
    ("spec", ("builder.spec", "builder.backends", "builder.selection")),
    ("image", ("builder.image",)),
    ("demo", ("builder.demo",)),
    ("cli", ("builder.cli", "builder.__main__")),
    ("docs", ("builder.reference",)),
)


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (annotations only: not an import at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the builder modules it imports at run time (any depth; `from pkg import sub` -> pkg.sub)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "builder"}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "builder":
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else owner(node.module)
                            for a in node.names}  # fmt: skip
        graph[name] = targets - {None, name}
    return graph


def tier(module: str) -> int:
    ranks = [(len(prefix), rank) for rank, (_, prefixes) in enumerate(TIERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]  # fmt: skip
    assert ranks, f"{module} belongs to no tier: add it to TIERS"
    return max(ranks)[1]


def test_no_import_reaches_a_higher_tier():
    upward = [f"{m} ({TIERS[tier(m)][0]}) imports {t} ({TIERS[tier(t)][0]})"
              for m, targets in import_graph().items() for t in sorted(targets) if tier(t) > tier(m)]  # fmt: skip
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circles():
    graph, seen, circles = import_graph(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            circles.append(" -> ".join(path[path.index(node) :] + [node]))
            return
        if node in seen:
            return
        for target in sorted(graph.get(node, ())):
            visit(target, path + [node])
        seen.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not circles, "\n".join(circles)


def test_chatglmcpp_requirements_are_what_it_imports():
    third_party = set()
    for path in (RUNTIME / "chatglmcpp").rglob("*.py"):
        third_party |= {m.split(".")[0] for m in imports(path)} - STDLIB - {"builder"}
    lines = (RUNTIME / "chatglmcpp" / "requirements.txt").read_text().splitlines()
    required = {re.split(r"[=<>\[ ]", line)[0].replace("-", "_") for line in lines if line and not line.startswith("#")}
    assert third_party - {"chatglm_cpp"} == required  # chatglm-cpp comes from the image's wheel stage


def _runtime_copies(dockerfile: str) -> list[tuple[list[str], str]]:
    """The builder files the `runtime` stage COPYs from the build context: (sources, destination)."""
    stage = dockerfile[dockerfile.index(" AS runtime") :]
    copies = []
    for line in stage.splitlines():
        if line.startswith("COPY src/builder"):
            *sources, dest = line.split()[1:]
            copies.append((sources, dest))
    return copies


def _runtime_tree(tmp_path: Path, backend: str) -> Path:
    """Lay out under tmp_path exactly what the rendered Dockerfile puts under /opt/app."""
    root = tmp_path / backend
    for sources, dest in _runtime_copies(render_text(BuildSpec())[f"Dockerfile.{backend}"]):
        target = root / dest.removeprefix("/opt/app/")
        for src in sources:
            src_path = PACKAGE.parent / src.removeprefix("src/")
            out = target / src_path.name if dest.endswith("/") else target
            out.parent.mkdir(parents=True, exist_ok=True)
            if src_path.is_dir():
                subprocess.run(["cp", "-r", str(src_path), str(out)], check=True)
            else:
                out.write_bytes(src_path.read_bytes())
    return root


@pytest.mark.parametrize(
    "backend, modules",
    [
        (
            "chatglmcpp",
            ["builder.runtime.chatglmcpp.app", "builder.runtime.chatglmcpp.__main__", "builder.runtime.smoke"],
        ),
        (
            "xinference",
            ["builder.runtime.xinference.__main__", "builder.runtime.xinference.cluster", "builder.runtime.smoke"],
        ),
        ("vllm", ["builder.runtime.vllm_boot", "builder.runtime.vllm_limits", "builder.runtime.smoke"]),
    ],
)
def test_runtime_images_run_from_what_they_copy(tmp_path, backend, modules):
    root = _runtime_tree(tmp_path, backend)
    shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*.py"))
    assert not [p for p in shipped if re.search(r"builder/(image|model|demo)/|builder/(cli|spec|backends)\.py", p)], (
        shipped
    )
    # Import the entry points with only that tree as `builder`: first on the path, and the editable
    # install's finder (which would map any builder.* name to the checkout) taken out.
    code = (
        "import importlib, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')]\n"
        "for m in sys.argv[1:]: importlib.import_module(m)\n"
        "assert not any(n.startswith(('builder.image', 'builder.model', 'builder.demo')) for n in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, *modules], cwd=root, capture_output=True, text=True,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
