"""Did the tiny pass and the full rehearsal together run every code cell of every notebook? Lists the one-mode cells.

Reads the records .ci/cell_trace.py left (one folder, both modes). A cell *runs* in a mode when a statement of it other
than a top-level `if` test executed: a cell that is all `if TINY:` runs in tiny mode only, however often its test is
evaluated. Exit 1, naming them, when a code cell ran in neither mode.

Usage: python .ci/cell_coverage.py RECORDS_DIR [NOTEBOOK ...]   (default: every notebook in notebooks/)
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from IPython.core.inputtransformer2 import TransformerManager

REPO = Path(__file__).resolve().parents[1]
MODES = ("tiny", "full")


def read_records(folder: Path) -> dict[str, dict[str, set[int]]]:
    """{mode: {compiled cell source: executed line numbers}} from every record file in `folder`."""
    executed: dict[str, dict[str, set[int]]] = {mode: {} for mode in MODES}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["mode"] in executed:
                executed[entry["mode"]].setdefault(entry["source"], set()).update(entry["lines"])
    return executed


def guard_lines(source: str) -> set[int]:
    """Line numbers of the top-level `if` tests: evaluating one says nothing about which branch ran."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {node.lineno for node in tree.body if isinstance(node, ast.If)}


def cell_modes(notebook: Path, executed: dict[str, dict[str, set[int]]]) -> dict[str, set[str]]:
    """{"c<index>": the modes that ran the cell} for every code cell of `notebook`."""
    transform = TransformerManager().transform_cell
    cells = json.loads(notebook.read_text())["cells"]
    modes = {}
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        source = transform("".join(cell["source"]))
        ran = {mode for mode in MODES if executed[mode].get(source, set()) - guard_lines(source)}
        modes[f"c{index}"] = ran
    return modes


def report(notebooks: list[Path], executed: dict[str, dict[str, set[int]]]) -> tuple[list[str], list[str]]:
    """Lines to print, and the cells no mode ran."""
    lines, missed = [], []
    for notebook in notebooks:
        modes = cell_modes(notebook, executed)
        one = {mode: [cell for cell, ran in modes.items() if ran == {mode}] for mode in MODES}
        neither = [cell for cell, ran in modes.items() if not ran]
        missed += [f"{notebook.stem} {cell}" for cell in neither]
        lines.append(
            f"{notebook.stem}: {len(modes) - len(neither)}/{len(modes)} code cells ran; "
            f"tiny only: {', '.join(one['tiny']) or '-'}; full only: {', '.join(one['full']) or '-'}"
            + (f"; NEITHER: {', '.join(neither)}" if neither else "")
        )
    return lines, missed


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    executed = read_records(Path(args[0]))
    for mode in MODES:
        if not executed[mode]:
            print(f"cell coverage: no {mode}-mode records in {args[0]}", file=sys.stderr)
            return 1
    notebooks = [Path(path) for path in args[1:]] or sorted((REPO / "notebooks").glob("*.ipynb"))
    lines, missed = report(notebooks, executed)
    print("\n".join(lines))
    if missed:
        print(f"cell coverage: no mode ran {', '.join(missed)}", file=sys.stderr)
        return 1
    print("cell coverage: every code cell ran in tiny or full mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
