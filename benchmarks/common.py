"""What the benchmarks share: the machine they ran on, step timing, options, results files, full-size random models.

Each measured training run has a fresh Python process (`probe.py`), so one run's allocator cache, peak-memory counters
and warm kernels never leak into the next one's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30


def machine() -> dict:
    """Where a measurement ran: the device, the CPU, the library versions and the date."""
    versions = {name: metadata.version(name) for name in ("torch", "diffusers", "transformers", "accelerate", "peft")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
    return {"device": device, "python": platform.python_version(), **versions, "date": time.strftime("%Y-%m-%d")}


def synchronize() -> None:
    """Wait for queued GPU work, so a timestamp means the work before it has finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def step_durations(stamps: list[float], warmup: int) -> list[float]:
    """Seconds of each step after the first `warmup` steps, from the timestamps taken as each step ended."""
    if warmup < 1 or len(stamps) <= warmup:
        raise ValueError(f"need at least one warm-up step and one measured step; got {len(stamps)} for {warmup=}")
    measured = stamps[warmup - 1 :]
    return [later - earlier for earlier, later in zip(measured[:-1], measured[1:], strict=True)]


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: the mode (CPU tiny, --gpu, --dry-run), --json and --models."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="the full-size cases on a CUDA GPU")
    mode.add_argument("--dry-run", action="store_true", help="the GPU cases on tiny components (CPU)")
    parser.add_argument("--json", type=Path, help="where to write the results (default: benchmarks/results/)")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dreambooth-bench-models",
        help="where the random full-size model folders are kept between runs (--gpu)",
    )
    return parser


def mode_label(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """ "gpu", "dry-run" or "cpu" (the results' file suffix); refuses --gpu without a CUDA GPU."""
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU; on a CPU, --dry-run runs the same cases on tiny components")
    return "gpu" if args.gpu else "dry-run" if args.dry_run else "cpu"


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def random_model_folder(kind: str, root: Path) -> Path:
    """A diffusers folder of the full-size `kind` architecture with random weights (fp16), written once under `root`.

    Built on the GPU when there is one (seconds instead of minutes for SDXL's 2.6 B parameters). SDXL's VAE is marked
    like the fp16-fix VAE that the presets name (`force_upcast` off): the same architecture, trusted in fp16.
    """
    from dreambooth_lib.models import full_size_components, save_components

    folder = root / f"random-{kind}"
    if (folder / "model_index.json").is_file():
        return folder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = full_size_components(kind, device=device, dtype=torch.float16)
    if kind == "sdxl":
        components.vae.register_to_config(force_upcast=False)
    save_components(components, folder)
    return folder
