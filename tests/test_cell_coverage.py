"""The cell-coverage check (.ci/cell_coverage.py) tells which mode ran each notebook cell, and fails on a cell neither
mode ran."""

import importlib.util
import json
from pathlib import Path

import pytest

CHECKER = Path(__file__).resolve().parents[1] / ".ci" / "cell_coverage.py"


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("cell_coverage", CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CELLS = [
    "import sys\n%pip --version",  # a magic: matched as IPython compiles it
    "if TINY:\n    small = 1\nelse:\n    large = 2",
    "if TINY:\n    only_tiny = 1",
    "if not TINY:\n    only_full = 1",
]


def notebook(tmp_path: Path) -> Path:
    cells = [{"cell_type": "markdown", "source": ["# title"]}]
    cells += [{"cell_type": "code", "source": source.splitlines(keepends=True)} for source in CELLS]
    path = tmp_path / "99_example.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    return path


def records(tmp_path: Path, coverage, ran: dict[str, dict[int, list[int]]]) -> Path:
    """Record files as cell_trace.py writes them: `ran[mode][cell] = executed line numbers`."""
    from IPython.core.inputtransformer2 import TransformerManager

    folder = tmp_path / "records"
    folder.mkdir()
    for mode, cells in ran.items():
        with (folder / f"{mode}-1.jsonl").open("w") as out:
            for cell, lines in cells.items():
                source = TransformerManager().transform_cell(CELLS[cell])
                out.write(json.dumps({"mode": mode, "source": source, "lines": lines}) + "\n")
    return folder


def test_one_mode_cells_are_listed_and_guards_alone_do_not_count(tmp_path, coverage):
    path = notebook(tmp_path)
    folder = records(
        tmp_path,
        coverage,
        {"tiny": {0: [1, 2], 1: [1, 2], 2: [1, 2], 3: [1]}, "full": {0: [1, 2], 1: [1, 4], 2: [1], 3: [1, 2]}},
    )
    lines, missed = coverage.report([path], coverage.read_records(folder))
    assert missed == []
    assert lines == ["99_example: 4/4 code cells ran; tiny only: c3; full only: c4"]


def test_a_cell_neither_mode_ran_fails_the_check(tmp_path, coverage, capsys):
    path = notebook(tmp_path)
    folder = records(tmp_path, coverage, {"tiny": {0: [1], 1: [1, 2], 3: [1]}, "full": {0: [1], 1: [1, 4], 3: [1]}})
    assert coverage.main([str(folder), str(path)]) == 1
    assert "no mode ran 99_example c3, 99_example c4" in capsys.readouterr().err
