"""IPython start-up script: record which lines of each notebook cell a kernel executes (for .ci/cell_coverage.py).

Loaded from an IPYTHONDIR's startup folder by the tiny pass (the README test command's nbval kernels, see .ci/run) and
by the full rehearsal (.ci/rehearse.py). Inert unless NOTEBOOK_CELL_RECORDS names a folder: then, after every cell, one
JSON line per cell file touched goes to <folder>/<mode>-<pid>.jsonl: {"mode", "source" (as IPython compiled it),
"lines" (executed line numbers)}. Only frames of cell code are traced; library code runs at full speed.
"""

import json
import linecache
import os
import sys
import threading
from pathlib import Path


def _start() -> None:
    folder = os.environ.get("NOTEBOOK_CELL_RECORDS")
    ipython = get_ipython()  # noqa: F821 (IPython defines it for start-up scripts)
    if not folder or ipython is None:
        return
    # The mode the notebook's own setup selects (DREAMBOOTH_MODE, else by the machine), without importing torch here.
    mode = os.environ.get("DREAMBOOTH_MODE") or ("full" if Path("/proc/driver/nvidia/gpus").is_dir() else "tiny")
    record = Path(folder) / f"{mode}-{os.getpid()}.jsonl"
    record.parent.mkdir(parents=True, exist_ok=True)
    executed: dict[str, set[int]] = {}

    def is_cell(filename: str) -> bool:
        return "ipykernel_" in filename or filename.startswith("<ipython-input")

    def trace_lines(frame, event, arg):
        if event == "line":
            executed.setdefault(frame.f_code.co_filename, set()).add(frame.f_lineno)
        return trace_lines

    def trace_calls(frame, event, arg):
        return trace_lines if is_cell(frame.f_code.co_filename) else None

    def before(*args):
        executed.clear()
        threading.settrace(trace_calls)
        sys.settrace(trace_calls)

    def after(*args):
        sys.settrace(None)
        threading.settrace(None)
        with record.open("a") as out:
            for filename, lines in executed.items():
                source = "".join(linecache.cache.get(filename, (None, None, []))[2])
                out.write(json.dumps({"mode": mode, "source": source, "lines": sorted(lines)}) + "\n")

    ipython.events.register("pre_run_cell", before)
    ipython.events.register("post_run_cell", after)


_start()
