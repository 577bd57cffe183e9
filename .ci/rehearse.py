"""The full-mode rehearsal: every notebook, top to bottom, in full mode, offline, against the stand-in hub cache.

What a Colab user runs, as closely as a machine without the hub allows:
- DREAMBOOTH_MODE=full, the real hub ids resolved from a stand-in cache (scripts/standin_hub.py) with HF_HUB_OFFLINE=1;
- DREAMBOOTH_REHEARSAL=cpu (or gpu) shrinks counts, and on a CPU precision and optimiser, in the notebook setup only;
- a stand-in `google.colab` is imported before the first cell, so the Colab branches run: `drive.mount(path)` makes a
  local folder appear as `path/MyDrive`, and runs train on "local disk" (/content/runs) and mirror to "Drive";
- each notebook is copied alone into an empty folder; 05 runs twice, the second time on a "new runtime" (local disk
  gone) that resumes from the Drive mirror.
A failing cell ends the rehearsal with `failed at <notebook> cell <n> (id <id>): <ExceptionType>: <message>`, exit 1.

Usage: python .ci/rehearse.py [--hub DIR] [--device cpu|gpu] [--records DIR] [--timings-json FILE] [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
CONTENT = Path("/content")  # where Colab keeps its disk and mounts Drive (dreambooth_lib.notebook's paths)
RESUMED = "05_dreambooth_sd15"  # executed twice: the second execution resumes from the Drive mirror
HUB_IDS = re.compile(
    r"(stable-diffusion-v1-5/stable-diffusion-v1-5|stabilityai/stable-diffusion-xl-base-1\.0|"
    r"madebyollin/sdxl-vae-fp16-fix|facebook/dino-vits16|openai/clip-vit-base-patch32)"
)

COLAB_INIT = '"""Stand-in for Colab\'s module (the rehearsal): present, so notebooks take their Colab branches."""\n'
COLAB_DRIVE = '''"""Stand-in Drive: mount(path) makes the rehearsal's local Drive folder appear as path/MyDrive."""
import os
from pathlib import Path


def mount(path, *args, **kwargs):
    mydrive = Path(path) / "MyDrive"
    if not mydrive.exists():
        mydrive.parent.mkdir(parents=True, exist_ok=True)
        mydrive.symlink_to(os.environ["REHEARSAL_DRIVE"], target_is_directory=True)
    print(f"Mounted at {path}")
'''
COLAB_FILES = """def upload(*args, **kwargs):
    raise RuntimeError("a notebook asked for an upload although its upload switch is off")
"""


# Run after a notebook's last cell in a GPU rehearsal: the kernel's peak CUDA memory (the process the notebook ran in).
PEAK_CELL = """import json, torch
print("PEAK " + json.dumps({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}))"""


class RehearsalFailure(Exception):
    """A cell failed; the message is the one line the rehearsal prints."""


def stand_in_colab(work: Path) -> dict[str, str]:
    """Write the stand-in `google.colab` and a kernel start-up script importing it; return the kernel's environment."""
    package = work / "fake-colab" / "google" / "colab"
    package.mkdir(parents=True)
    for name, text in {"__init__.py": COLAB_INIT, "drive.py": COLAB_DRIVE, "files.py": COLAB_FILES}.items():
        (package / name).write_text(text)
    startup = work / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab\n")
    shutil.copy(REPO / ".ci" / "cell_trace.py", startup / "01-cell-trace.py")  # records lines run, when asked
    (work / "drive").mkdir()
    python_path = os.pathsep.join(filter(None, [str(work / "fake-colab"), os.environ.get("PYTHONPATH")]))
    return {
        "PYTHONPATH": python_path,  # the stand-in first, beside what the caller set (gpu.sh's wheels)
        "IPYTHONDIR": str(work / "ipython"),
        "REHEARSAL_DRIVE": str(work / "drive"),
    }


def write_hub(cache: Path, full: bool) -> Path:
    spec = importlib.util.spec_from_file_location("standin_hub", REPO / "scripts" / "standin_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_standin_hub(cache, full=full)


def execute(path: Path, folder: Path, timeout: int, measure_gpu: bool) -> str:
    """Run one notebook in `folder`; return all its text output (with a PEAK line after it when `measure_gpu`)."""
    notebook = nbformat.read(path, as_version=4)
    if measure_gpu:
        notebook.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    text = []
    try:
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                if cell.cell_type != "code":
                    continue
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as error:
                    print(error, file=sys.stderr)  # the cell's traceback, for whoever fixes it; the one line comes last
                    where = f"{path.stem} cell {index} (id {cell.get('id', f'c{index}')})"
                    raise RehearsalFailure(f"failed at {where}: {error.ename}: {error.evalue}") from None
                for output in cell.get("outputs", []):
                    text.append(output.get("text", "") + "".join(output.get("data", {}).get("text/plain", "")))
    finally:
        nbformat.write(notebook, folder / f"{path.stem}.executed.ipynb")  # to look at, above all after a failure
    return "".join(text)


def summary(name: str, output: str) -> str:
    """The lines that show the notebook ran as asked: its mode, the rehearsal line, the hub ids it loaded."""
    mode = next((line for line in output.splitlines() if line.startswith("mode:")), "mode: (not printed)")
    rehearsal = next(
        (line for line in output.splitlines() if line.startswith("rehearsal:")), "rehearsal: (not printed)"
    )
    ids = sorted(set(HUB_IDS.findall(output))) or ["(no hub model)"]
    return f"{name}: {mode.split(':', 1)[1].strip()} | {rehearsal.split(':', 1)[1].strip()[:60]}... | {', '.join(ids)}"


def rehearse(notebooks: list[Path], work: Path, hub: Path, device: str, timeout: int) -> dict[str, dict]:
    env = stand_in_colab(work)
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "DREAMBOOTH_MODE": "full", "DREAMBOOTH_REHEARSAL": device}
    os.environ.update(env)
    timings = {}
    for path in notebooks:
        runs = 2 if path.stem == RESUMED else 1
        folder = work / "notebooks" / path.stem
        folder.mkdir(parents=True)
        shutil.copy(path, folder)
        for run in range(runs):
            if run:  # a new Colab runtime: its local disk is gone, Drive is still there
                shutil.rmtree(CONTENT / "runs", ignore_errors=True)
            start = time.perf_counter()
            output = execute(folder / path.name, folder, timeout, measure_gpu=device == "gpu")
            seconds = time.perf_counter() - start
            peak = re.search(r"^PEAK (.*)$", output, re.MULTILINE)
            measured = {"wall_s": round(seconds, 1), **(json.loads(peak.group(1)) if peak else {})}
            timings[path.stem + (" (resumed)" if run else "")] = measured
            print(f"{summary(path.stem, output)} | {seconds:.0f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    parser.add_argument("--hub", type=Path, help="a stand-in hub cache to use (default: write a tiny one)")
    parser.add_argument("--full-size", action="store_true", help="write a full-size stand-in cache (for a GPU)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="the DREAMBOOTH_REHEARSAL kind")
    parser.add_argument("--records", type=Path, help="record the lines each cell ran here (.ci/cell_coverage.py)")
    parser.add_argument("--timings-json", type=Path, help="write each notebook's wall time (and GPU peaks) here")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one cell may take")
    args = parser.parse_args(argv)
    notebooks = [path.resolve() for path in args.notebooks] or sorted((REPO / "notebooks").glob("*.ipynb"))
    if CONTENT.exists():
        print(
            f"rehearse: {CONTENT} exists; the rehearsal stands in for Colab there and will not touch it",
            file=sys.stderr,
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="rehearsal-"))
    try:
        hub = args.hub or write_hub(work / "hub", full=args.full_size)
        if args.records:
            os.environ["NOTEBOOK_CELL_RECORDS"] = str(args.records.resolve())
        timings = rehearse(notebooks, work, hub, args.device, args.timeout)
    except RehearsalFailure as failure:
        shutil.rmtree(work / "hub", ignore_errors=True)
        print(f"(the executed notebooks are kept in {work / 'notebooks'})\n{failure}", file=sys.stderr)
        return 1
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(CONTENT, ignore_errors=True)  # only ever the rehearsal's own: it refused to start if it existed
    if args.timings_json:
        args.timings_json.parent.mkdir(parents=True, exist_ok=True)
        args.timings_json.write_text(json.dumps(timings, indent=1) + "\n")
    total = sum(measured["wall_s"] for measured in timings.values())
    print(f"rehearsal: passed ({len(notebooks)} notebooks, {total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
