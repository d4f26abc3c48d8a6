"""The import graph: config and storage at the bottom, inference apart from the node's
networking and storage, no cycles between packages, no training code in the node."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "cxrtriage"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def project_imports(path: Path) -> set[str]:
    """Every cxrtriage module a file imports, at module level or inside functions (lazy
    imports count: they run), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cxrtriage")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("cxrtriage"):
                found.add(target)
                # "from . import x" / "from .pkg import module": the submodule itself is imported
                found |= {f"{target}.{a.name}" for a in node.names if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                          or (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).is_dir()}
    return found


GRAPH: dict[str, set[str]] = {module_name(p): project_imports(p) for p in PACKAGE.rglob("*.py")}


def top(module: str) -> str:
    """The package (or top-level module) a module belongs to: cxrtriage.scp.ingest -> scp."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports_of(prefix: str) -> set[str]:
    return {t for m, targets in GRAPH.items() if m == prefix or m.startswith(prefix + ".") for t in targets}


@pytest.mark.parametrize("bottom", ["cxrtriage.config", "cxrtriage.storage"])
def test_config_and_storage_import_nothing_else_of_the_project(bottom: str) -> None:
    outside = {t for t in imports_of(bottom) if not (t == bottom or t.startswith(bottom + ".")) and t != "cxrtriage"}
    assert outside == set(), f"{bottom} imports {sorted(outside)}"


def reachable_from(start: str) -> set[str]:
    """Every project module that importing ``start`` can import, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(t for t in GRAPH.get(module, ()) if t in GRAPH)
    return seen


def test_inference_knows_nothing_of_networking_storage_or_triage() -> None:
    inference = [m for m in GRAPH if m.startswith("cxrtriage.inference")]
    bad = {m for start in inference for m in reachable_from(start) if top(m) in {"scp", "storage", "triage", "node", "stages"}}
    assert bad == set(), sorted(bad)


def test_no_cycles_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        for target in targets:
            if top(target) != top(module) and top(target) != "cxrtriage":
                edges.setdefault(top(module), set()).add(top(target))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in edges if reaches(p, p, {p}))
    assert cycles == [], f"packages in an import cycle: {cycles} (edges: { {k: sorted(v) for k, v in edges.items()} })"


def test_the_node_never_imports_training_code() -> None:
    training = sorted(m for m in reachable_from("cxrtriage.node") if ".training" in m)
    assert training == [], f"the node reaches {training}"


def test_importing_config_imports_no_torch() -> None:
    probe = "import sys, cxrtriage.config; print(sorted(m for m in ('torch', 'segmentation_models_pytorch', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
