"""The repository's promises: CI runs what the README says, and notebooks agree on where the package comes from."""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_setup_and_test_command():
    setup, test = _bash_blocks((ROOT / "README.md").read_text())[:2]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    # The set-up minus the main job, then the test command, in the README's order.
    expected = [line for line in setup if not line.startswith("python -m dreambooth_lib")] + test
    positions = [ci_lines.index(line) for line in expected]
    assert positions == sorted(positions)


def test_notebooks_install_from_one_source():
    readme_source = re.search(r'PACKAGE_SOURCE = "([^"]+)"', (ROOT / "README.md").read_text()).group(1)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = "".join(cells[next(i for i, c in enumerate(cells) if c["cell_type"] == "code")]["source"])
        assert f'PACKAGE_SOURCE = "{readme_source}"' in code, f"{notebook.name}: first code cell must install it"
        assert "google.colab" in code, f"{notebook.name}: the install must be guarded to Colab"
        install = next(line for line in code.splitlines() if "%pip" in line)
        assert "torch" not in install, f"{notebook.name}: the install must leave Colab's torch alone"


def test_committed_notebooks_are_small():
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert notebook.stat().st_size < 200_000, f"{notebook.name}: strip outputs before committing"


def test_notebooks_are_valid_for_the_format_version_they_declare():
    """The classic notebook (Colab's widget protocol) opens an invalid notebook behind a blocking "Notebook validation
    failed" dialog: 04 once declared nbformat 4.4 while two of its cells carried ids, which need 4.5."""
    import nbformat

    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        content = nbformat.read(notebook, as_version=nbformat.NO_CONVERT)
        errors = [error.message for error in nbformat.validator.iter_validate(content)]
        assert not errors, f"{notebook.name}: {errors[:3]}"
