"""The package's shape: the import graph has no cycle and respects the layering of the layout, and the README's
layout section is the tree as it is.

The import graph is read from the source with `ast` (every `import` / `from ... import` of a package module, at
module level or inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

import modsquad

PACKAGE = Path(modsquad.__file__).parent
README = PACKAGE.parents[1] / "README.md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def area(module: str) -> str:
    """`modsquad.training.trainer` -> `training`; top-level modules are areas of their own."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_the_areas_form_a_layered_graph():
    areas: dict[str, set[str]] = defaultdict(set)
    for module, imported in import_graph().items():
        for other in imported:
            if area(module) != area(other) and module != "modsquad":
                areas[area(module)].add(area(other))
    assert find_cycle(areas) is None, dict(areas)


def test_the_model_folder_imports_only_its_siblings():
    # Remote code is copied flat next to the weights: only single-level relative imports survive that.
    for path in (PACKAGE / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module, f"{path.name}: from {'.' * node.level}{node.module}"
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("modsquad"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                assert all(not a.name.startswith("modsquad") for a in node.names), path.name


def test_only_the_router_imports_the_commands():
    for module, imported in import_graph().items():
        if area(module) not in ("commands", "cli"):
            assert not any(area(m) == "commands" for m in imported), module


# ---------------------------------------------------------------------------------------------------- README
def layout_block() -> str:
    """The README's layout block, from the tree: each folder of the package, its one-line role (its docstring up to
    the first colon) and its modules."""
    lines = ["src/modsquad/", f"  {'  '.join(sorted(p.name for p in PACKAGE.glob('*.py')))}"]
    for folder in sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
        role = docstring.split(":", 1)[0].replace("\n", " ")
        entries = sorted(p.name for p in folder.glob("*.py") if p.name != "__init__.py")
        entries += sorted(f"{p.name}/" for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__")
        lines.append(f"  {folder.name + '/':<13}{role}")
        row = " " * 15
        for entry in entries:
            if len(row) + len(entry) + 2 > 110:
                lines.append(row.rstrip())
                row = " " * 15
            row += entry + "  "
        lines.append(row.rstrip())
    return "\n".join(lines)


def test_readme_layout_section_is_the_tree():
    text = README.read_text()
    match = re.search(r"<!-- layout:start -->\n```text\n(.*?)\n```\n<!-- layout:end -->", text, re.S)
    if match is None:
        pytest.fail("README.md has no layout block between <!-- layout:start --> and <!-- layout:end -->")
    assert match.group(1) == layout_block(), f"the README's layout block should read:\n{layout_block()}"
