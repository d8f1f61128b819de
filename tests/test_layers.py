"""The package's import structure: no cycle (function-level imports included), every folder imports
only its own layer or those below it, ``config.py`` is a leaf, and built-in names are registered in
one module. ARCHITECTURE.md draws the same layers.

Imports are read with ``ast`` from the source (nothing is imported), so an import inside a function
counts like one at the top: a cycle through function-level imports never fails at import time, but
it still means the bottom of the house depends on its top.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stagewise"

# layer of each top-level module / folder of stagewise: a unit may import units of its own layer
# or lower ones, never higher (ARCHITECTURE.md, "Layers")
LAYERS = {
    "stagewise": 0, "errors": 0, "seeds": 0, "faults": 0,
    "registry": 1, "config": 1,
    "tracking": 2, "trackers": 2,
    "models": 3, "optim": 3, "machine": 3, "parallel": 3, "lm_head": 3,
    "checkpoint": 4,
    "data": 5, "generation": 5, "prefix_sharing": 5,
    "envs": 6, "rewards": 6, "reward_functions": 6,
    "domains": 7,
    "training": 8,
    "rl": 9, "sft": 9,
    "evaluation": 10, "planning": 10,
    "demos": 10,
    "builtins": 11,
    "continual": 12, "report": 12,
    "sweep": 13, "doctor": 13,
    "cli": 14, "__main__": 14,
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source (and their parent packages,
    whose __init__ runs first)."""
    pkg = root.name
    modules = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src for a in node.names]
            for t in targets:
                if t != pkg and not t.startswith(pkg + "."):
                    continue
                while t not in modules and "." in t:  # `import a.b.c` of an attribute: its module
                    t = t.rsplit(".", 1)[0]
                parts = t.split(".")
                for k in range(1, len(parts) + 1):
                    target = ".".join(parts[:k])
                    if target != mod:
                        graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle():
    found = cycles(import_graph(PACKAGE))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_planted_cycle(tmp_path):
    """A copy of the package with one function-level import planted at its bottom: the check fails."""
    copy = tmp_path / "stagewise"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert not cycles(import_graph(copy))
    with (copy / "config.py").open("a") as fh:
        fh.write("\n\ndef _planted():\n    from stagewise.cli import main  # noqa: F401\n")
    found = cycles(import_graph(copy))
    assert len(found) == 1 and {"stagewise.config", "stagewise.cli"} <= set(found[0]), found


def test_every_unit_imports_only_its_layer_or_lower():
    graph = import_graph(PACKAGE)
    assert {unit(m) for m in graph} <= set(LAYERS), set(map(unit, graph)) - set(LAYERS)  # a new folder: place it
    wrong = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if LAYERS[unit(a)] < LAYERS[unit(b)])
    assert not wrong, "imports reaching up a layer:\n" + "\n".join(wrong)


def test_config_is_a_leaf():
    graph = import_graph(PACKAGE)
    assert graph["stagewise.config"] <= {"stagewise", "stagewise.errors"}, graph["stagewise.config"]
    assert graph["stagewise.registry"] <= {"stagewise", "stagewise.errors"}


def test_built_in_names_are_registered_in_one_module():
    registering = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stagewise.registry" and any(
                    a.name == "register" for a in node.names):
                registering.append(module_name(PACKAGE, path))
    assert registering == ["stagewise.builtins"], registering


@pytest.mark.parametrize("package", ["rl", "sft", "generation", "envs", "domains", "parallel", "data", "training",
                                     "continual"])
def test_package_inits_hold_no_imports(package):
    """A package __init__ that imports its modules makes every `from package.x import y` load them all
    (and is how package-level cycles start)."""
    tree = ast.parse((PACKAGE / package / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
