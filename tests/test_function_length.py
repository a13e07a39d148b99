"""Every function and method of the package fits on a screen: at most MAX_LINES lines from `def` to its last."""

import ast

from conftest import REPO

MAX_LINES = 80
PACKAGE = REPO / "src" / "ctcohort"


def long_functions(source: str, module: str, limit: int = MAX_LINES) -> dict[str, int]:
    """module.qualified_name -> lines, of each function or method over ``limit`` lines (decorators not counted)."""
    found = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}.{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and lines > limit:
                    found[name] = lines
                visit(child, name)
            else:
                visit(child, prefix)

    visit(ast.parse(source), module)
    return found


def test_no_function_of_the_package_is_longer_than_80_lines():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        found.update(long_functions(path.read_text(encoding="utf-8"), module))
    assert not found, "longer than 80 lines: " + ", ".join(f"{n} ({k})" for n, k in sorted(found.items()))


def statements(count: int, indent: int) -> str:
    return "".join(f"{' ' * indent}x{i} = {i}\n" for i in range(count))


def test_a_long_method_and_a_long_nested_function_are_named_and_80_lines_pass():
    source = (
        "class Fitter:\n    def fit(self):\n"
        + statements(80, 8)
        + "def outer():\n    def inner():\n"
        + statements(80, 8)
        + "    return inner\n"
        + "def short():\n"
        + statements(79, 4)
    )
    assert long_functions(source, "m") == {"m.Fitter.fit": 81, "m.outer": 83, "m.outer.inner": 81}
