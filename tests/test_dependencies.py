"""`pip install .` alone must be enough: every third-party module that the library or a notebook's code imports is a
declared runtime requirement, because Colab installs nothing but the package (and keeps what it already has)."""

from __future__ import annotations

import ast
import json
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent

# Imported on purpose without being required, each behind a check that keeps the package working without it.
NOT_REQUIRED = {
    "google": "Colab's own module, imported only when google.colab is loaded",
    "lpips": "optional: DIV falls back to 1 - DINO similarity when lpips does not import",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements() -> list[str]:
    """The runtime requirements pyproject.toml declares now (not the installed metadata, which an edit of
    pyproject.toml leaves stale until the next install), without the extras (`dev`, `xformers`)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def declared_requirements() -> set[str]:
    """Distribution names of the package's runtime dependencies."""
    return {_normalise(re.match(r"[A-Za-z0-9_.-]+", line).group(0)) for line in runtime_requirements()}


def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in `source`; IPython's `%` and `!` lines are skipped."""
    # A magic line becomes `pass` at its own indentation, so the `if` guarding it still parses.
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in source.splitlines()]
    code = "\n".join(lines)
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def undeclared_imports(sources: dict[str, str], declared: set[str]) -> list[str]:
    """One line per third-party import in `sources` whose distribution is not among `declared`."""
    distributions = packages_distributions()
    problems = []
    for where, source in sources.items():
        for module in sorted(imported_modules(source)):
            if module in sys.stdlib_module_names or module == "dreambooth_lib" or module in NOT_REQUIRED:
                continue
            provided_by = {_normalise(name) for name in distributions.get(module, [module])}
            if not provided_by & declared:
                problems.append(f"{where}: imports {module} ({', '.join(sorted(provided_by))}), not a dependency")
    return problems


def _project_sources() -> dict[str, str]:
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "dreambooth_lib").rglob("*.py"))}
    sources.update({str(p.relative_to(ROOT)): notebook_code(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))})
    return sources


def test_every_import_of_the_library_and_notebooks_is_a_runtime_dependency():
    assert undeclared_imports(_project_sources(), declared_requirements()) == []


def test_an_undeclared_notebook_import_is_caught():
    sources = _project_sources()
    sources["notebooks/99_new.ipynb"] = "import sys\n%pip install -q seaborn\nimport seaborn as sns\nimport torch\n"
    problems = undeclared_imports(sources, declared_requirements())
    assert problems == ["notebooks/99_new.ipynb: imports seaborn (seaborn), not a dependency"]


def test_a_dev_only_requirement_does_not_count_as_runtime():
    # scikit-learn is imported by notebook 02 and the toy model; as a `dev` extra alone it would not reach Colab.
    declared = declared_requirements() - {"scikit-learn"}
    assert any("imports sklearn" in line for line in undeclared_imports(_project_sources(), declared))


def test_colab_keeps_its_ipywidgets_and_torch():
    requirements = runtime_requirements()
    widgets = next(r for r in requirements if r.startswith("ipywidgets"))
    torch = next(r for r in requirements if r.startswith("torch"))
    assert widgets == "ipywidgets>=7.6", "Colab's ipywidgets 7.7.1 must satisfy the range"
    assert "<" not in torch and "==" not in torch, "a bound on torch would make pip replace Colab's torch"
