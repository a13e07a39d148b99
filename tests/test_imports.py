"""The package's modules import each other without a circle (a low module of shared names instead)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = "ctcohort"


def imported_modules(path: Path, package_modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (at the top, in functions, under if)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = PACKAGE if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{PACKAGE}.{node.module}"
            # `from ctcohort import qc` imports the module qc; `from ctcohort.qc import X` the module qc
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(
            name.split(".", 2)[1]
            for name in names
            if name.startswith(f"{PACKAGE}.") and name.split(".", 2)[1] in package_modules
        )
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    modules = {path.stem for path in package_dir.glob("*.py")}
    return {path.stem: imported_modules(path, modules) - {path.stem} for path in sorted(package_dir.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as its modules in order (the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph(REPO / "src" / PACKAGE)
    assert "qc" in graph["measure"] and "columns" in graph["qc"]  # the graph sees the package's imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_an_import_circle_is_named_also_through_a_function_level_import(tmp_path):
    package = tmp_path / PACKAGE
    package.mkdir()
    (package / "a.py").write_text("from ctcohort.b import f\n")
    (package / "b.py").write_text("import numpy\n\ndef f():\n    from ctcohort import c\n")
    (package / "c.py").write_text("from . import a\n")
    (package / "d.py").write_text("import ctcohort.a\n")
    graph = import_graph(package)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def test_the_sheet_knows_no_dicom():
    graph = import_graph(REPO / "src" / PACKAGE)
    reached, todo = set(), ["sheet"]
    while todo:
        for module in graph[todo.pop()] - reached:
            reached.add(module)
            todo.append(module)
    assert not [module for module in reached if module.startswith("dicom")], sorted(reached)
    assert "columns" in graph["dicom_import"]  # which reads a NIfTI path the way the sheet does
