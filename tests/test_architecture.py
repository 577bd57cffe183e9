"""The library's shape: data flows one way between its modules (no import cycle), and no function is over 80 lines.

Read from the source with `ast`, so an import inside a function (a "lazy" import) counts like one at the top.
"""

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "dreambooth_lib"
MAX_FUNCTION_LINES = 80


def import_graph() -> dict[str, set[str]]:
    """For each module of the library, the library modules it imports (anywhere in its source)."""
    modules = {path.stem for path in LIBRARY.glob("*.py")}
    graph = {}
    for path in sorted(LIBRARY.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dreambooth_lib":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dreambooth_lib."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {
                    alias.name.split(".")[1] for alias in node.names if alias.name.startswith("dreambooth_lib.")
                }
        graph[path.stem] = (imported & modules) - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with the current path on a stack)."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return None
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_layering():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"train": {"data", "models"}, "data": set(), "models": {"config"}, "config": set()}) is None


def test_the_library_has_no_import_cycle():
    graph = import_graph()
    assert {"train", "data", "images", "models", "config"} <= graph.keys()  # the walk found the library
    assert "models" in graph["train"] and "images" in graph["data"]  # and its imports
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_library_function_is_over_80_lines():
    long = []
    for path in sorted(LIBRARY.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
