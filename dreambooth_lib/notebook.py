"""What every notebook does before its first lesson: say which mode it runs in and why, pick the device, and (in the
run notebooks) choose where a training run keeps its files.

One call, `notebook_setup()`, so that eight notebooks do not each carry their own copy of these decisions. The rules it
keeps: a tiny run (a CPU, or a Colab CPU runtime) is a throwaway demonstration that never touches Google Drive; a full
run on Colab lives on Drive so that it survives a disconnect; nothing here ever deletes a folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreambooth_lib.checkpoints import checkpoint_step, latest_checkpoint
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.environment import EnvironmentReport, ModeChoice, default_device, environment_report
from dreambooth_lib.runs import CHECKPOINTS

DRIVE_MOUNT = Path("/content/drive")
# Full runs on Colab are kept here, one folder per run, so a reconnected runtime finds and resumes them.
DRIVE_RUNS = DRIVE_MOUNT / "MyDrive" / "dreambooth-course"
LOCAL_RUNS = Path("outputs")
# A Colab runtime's own disk: fast and roomy, but gone with the runtime; full runs train here and mirror to Drive.
COLAB_LOCAL_RUNS = Path("/content/runs")

# Tiny mode demonstrates the run notebooks' workflow in seconds: a few steps and images show every stage.
TINY_RUN_SETTINGS: dict[str, int] = {
    "max_steps": 20,
    "num_class_images": 4,
    "class_inference_steps": 2,
    "num_validation_images": 2,
    "validation_inference_steps": 2,
}

# The rehearsal of full mode (.ci/full-rehearsal, benchmarks/gpu.sh rehearsal) against a stand-in hub cache: the
# full-mode code runs as written, with counts shrunk so every notebook finishes in about a minute. Never set on Colab.
REHEARSAL_VARIABLE = "DREAMBOOTH_REHEARSAL"
REHEARSAL_COUNT = 2  # the most steps, images, prompts or sampling steps a rehearsal runs of anything
REHEARSAL_RUN_SETTINGS: dict[str, int] = {
    "max_steps": 2,
    "num_class_images": 2,
    "class_inference_steps": 2,
    "num_validation_images": 1,
    "validation_inference_steps": 2,
}
# On a CPU, what only CUDA runs: 8-bit AdamW (bitsandbytes) and fp16 mixed precision.
REHEARSAL_CPU_SETTINGS: dict[str, object] = {"mixed_precision": "no", "use_8bit_adam": False}
T4_MEMORY = 15 * 2**30  # a Colab T4's usable memory: the GPU rehearsal caps the process at it


def rehearsal_requested() -> str | None:
    """`cpu` or `gpu` when DREAMBOOTH_REHEARSAL asks for a rehearsal of full mode, else None."""
    requested = os.environ.get(REHEARSAL_VARIABLE, "").strip().lower()
    if requested and requested not in ("cpu", "gpu"):
        raise ValueError(f"{REHEARSAL_VARIABLE}={requested!r}: use cpu or gpu, or unset it (no rehearsal).")
    return requested or None


def on_colab() -> bool:
    """True inside a Colab runtime, which imports `google.colab` before any cell runs."""
    return "google.colab" in sys.modules


@dataclass(frozen=True)
class NotebookSetup:
    """The mode, the device and the run-folder rules a notebook works with (see `notebook_setup`)."""

    report: EnvironmentReport
    device: torch.device
    colab: bool = field(default_factory=on_colab)
    rehearsal: str | None = None  # "cpu" or "gpu" in a rehearsal of full mode (see REHEARSAL_VARIABLE)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a notebook loads frozen weights in: fp16 on CUDA, fp32 elsewhere (a CPU computes fp16 slowly or
        not at all)."""
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def count(self, value: int) -> int:
        """A count of steps, images or prompts the notebook names for full mode, shrunk in a rehearsal."""
        return min(value, REHEARSAL_COUNT) if self.rehearsal else value

    @property
    def mode(self) -> ModeChoice:
        return self.report.mode

    @property
    def tiny(self) -> bool:
        return self.report.mode.is_tiny

    def run_dir(self, name: str) -> Path:
        """The folder a training run called `name` keeps its files in.

        - tiny mode: a new temporary folder of this session's own, so a re-run starts clean without deleting anything
          and a Colab CPU runtime never writes to Drive;
        - full mode on Colab: `MyDrive/dreambooth-course/<name>` on Google Drive (mounted here), which survives a
          disconnect; running the notebook again resumes that run;
        - full mode elsewhere: `outputs/<name>` beside the notebook.
        """
        if self.tiny:
            return Path(tempfile.mkdtemp(prefix=f"{name}-tiny-"))
        if self.colab:
            mount_drive()
            return DRIVE_RUNS / name
        return LOCAL_RUNS / name

    def training_folders(self, run_dir: Path) -> dict[str, str | None]:
        """`output_dir` and `mirror_dir` for a training run kept in `run_dir` (from `run_dir()`).

        On Colab in full mode the run trains on the runtime's local disk and `run_dir` on Drive mirrors its latest
        checkpoint and its results, from which a new runtime resumes (`TrainConfig.mirror_dir`); Drive then never
        holds more than one checkpoint. Elsewhere the run trains in `run_dir` itself.
        """
        if self.colab and not self.tiny:
            return {"output_dir": str(COLAB_LOCAL_RUNS / run_dir.relative_to(DRIVE_RUNS)), "mirror_dir": str(run_dir)}
        return {"output_dir": str(run_dir), "mirror_dir": None}

    def resumed(self, config: TrainConfig) -> TrainConfig:
        """`config`, with max_steps raised to the step its run already reached when an earlier execution trained it
        further (notebook 05's "train longer" cell): running the notebook again then resumes the run where it stands,
        instead of stopping at a checkpoint beyond max_steps. Unchanged unless config resumes ('latest')."""
        folders = [Path(folder) / CHECKPOINTS for folder in (config.output_dir, config.mirror_dir) if folder]
        latest = latest_checkpoint(folders) if config.resume_from == "latest" else None
        if latest is None or checkpoint_step(latest) <= config.max_steps:
            return config
        step = checkpoint_step(latest)
        print(f"this run was trained to step {step} before: max_steps {config.max_steps} -> {step}, to resume there")
        return config.replace(max_steps=step)

    def run_settings(self) -> dict[str, object]:
        """Settings that shrink a run to a demonstration in tiny mode; none in full mode (a rehearsal's otherwise)."""
        if self.tiny:
            return dict(TINY_RUN_SETTINGS)
        if self.rehearsal:
            return {**REHEARSAL_RUN_SETTINGS, **(REHEARSAL_CPU_SETTINGS if self.rehearsal == "cpu" else {})}
        return {}


def mount_drive() -> None:
    """Mount Google Drive at /content/drive (Colab asks for permission once per runtime); a no-op if mounted."""
    if (DRIVE_MOUNT / "MyDrive").is_dir():
        return
    from google.colab import drive  # only ever called on Colab

    drive.mount(str(DRIVE_MOUNT))


def notebook_setup() -> NotebookSetup:
    """Print the mode (tiny or full) and why, the device and the library versions; return them for the notebook."""
    report = environment_report()
    print(report)
    setup = NotebookSetup(report=report, device=default_device(), rehearsal=rehearsal_requested())
    if setup.rehearsal:
        print(f"rehearsal:    {_start_rehearsal(setup)}")
    return setup


def _start_rehearsal(setup: NotebookSetup) -> str:
    """Apply what a rehearsal changes on this machine and say what it changed."""
    changed = f"counts of steps, images and prompts at most {REHEARSAL_COUNT}"
    if setup.rehearsal == "cpu":
        return changed + "; fp32 and plain AdamW on the CPU (no fp16, no 8-bit AdamW)"
    if setup.device.type != "cuda":
        raise RuntimeError(f"{REHEARSAL_VARIABLE}=gpu needs a CUDA GPU; use {REHEARSAL_VARIABLE}=cpu here.")
    total = torch.cuda.get_device_properties(setup.device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_MEMORY / total), setup.device)
    return changed + f"; this process capped at {T4_MEMORY / 2**30:.0f} GiB of GPU memory, as on a T4"
