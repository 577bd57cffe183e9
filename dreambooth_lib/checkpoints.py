"""Resumable checkpoints: written whole or not at all, found again by step, pruned to a limit.

`accelerator.save_state` writes the trainable weights, optimiser, learning-rate schedule and every process's RNG
state into `checkpoint-<step>.tmp`; only when all processes are done is the folder renamed to `checkpoint-<step>`.
A crash mid-write leaves a `.tmp` folder, which `latest_checkpoint` never picks.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimiser step a checkpoint folder was saved at (from its name `checkpoint-<step>`)."""
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be checkpoint-<step>.")
    return int(match.group(1))


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (half-written `.tmp` folders are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and _NAME.match(path.name)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `folder`, or None."""
    found = list_checkpoints(folder)
    return found[-1] if found else None


def resolve_resume(resume_from: str | None, folder: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: None, 'latest' (None when there is none yet) or an explicit folder."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(folder)
    path = Path(resume_from)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from={resume_from!r}: no such checkpoint folder.")
    checkpoint_step(path)  # refuses .tmp and other folders
    return path


def save_checkpoint(accelerator: Accelerator, folder: str | os.PathLike, step: int, keep: int | None) -> Path:
    """Save the training state at `step` atomically, then delete the oldest checkpoints beyond `keep`.

    Every process must call this (each writes its RNG state); only the main process renames and prunes.
    """
    folder = Path(folder)
    final = folder / f"checkpoint-{step}"
    temporary = folder / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)  # left by an earlier crash at this very step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if keep is not None:
            for old in list_checkpoints(folder)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
