"""Resumable checkpoints: written whole or not at all, marked with their run, found again by step, pruned to a limit.

`accelerator.save_state` writes the trainable weights, optimiser, learning-rate schedule and every process's RNG
state into a hidden temporary folder; the main process adds `run.json` (the run's id and fingerprint digest) and the
loss log so far, and,
when all processes are done, renames it to `checkpoint-<step>`. A crash mid-write leaves only a hidden temporary,
which is never picked and is cleared on the next start.

Only the checkpoints of the current run (same `run_id`) are resumed from or pruned, and pruning removes only ones below
the step just saved: a longer, older run's `checkpoint-800` in the same folder is neither picked nor the reason the new
`checkpoint-200` is deleted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from dreambooth_lib.files import (
    check_free_space,
    copy_atomically,
    remove,
    replace,
    temporary_name,
    undone_on_error,
)
from dreambooth_lib.losslog import write_loss_log
from dreambooth_lib.runs import RunFolderError

_NAME = re.compile(r"^checkpoint-(\d+)$")
MARKER = "run.json"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimiser step a checkpoint folder was saved at (from its name `checkpoint-<step>`)."""
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder: its name must be checkpoint-<step>.")
    return int(match.group(1))


def checkpoint_run(path: str | os.PathLike) -> dict:
    """The checkpoint's marker: `{"run_id", "digest", "step"}` ({} for a checkpoint without one)."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}


def list_checkpoints(folder: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints in `folder` (of run `run_id` only, when given), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if path.is_dir() and _NAME.match(path.name)]
    if run_id is not None:
        found = [path for path in found if checkpoint_run(path).get("run_id") == run_id]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(folders: str | os.PathLike | list, run_id: str | None = None) -> Path | None:
    """The newest complete checkpoint (of run `run_id`) in `folders` (one, or several: the first wins a tie)."""
    folders = folders if isinstance(folders, list) else [folders]
    found = [path for folder in folders for path in list_checkpoints(folder, run_id)]
    return max(found, key=checkpoint_step, default=None)  # max keeps the first of equal steps


def resolve_resume(
    resume_from: str | None, folders: str | os.PathLike | list, run_id: str | None = None, digest: str | None = None
) -> Path | None:
    """The checkpoint to resume from: None, 'latest' (this run's newest; None when there is none yet) or a folder.

    An explicit folder must be a complete checkpoint of a run with the same fingerprint `digest` (when given).
    """
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(folders, run_id)
    path = Path(resume_from)
    if not path.is_dir() or not _NAME.match(path.name):
        raise RunFolderError(
            f"resume_from={resume_from!r} is not a complete checkpoint folder (checkpoint-<step>): use 'latest' or "
            "one of the checkpoint-<step> folders in the run folder's checkpoints/."
        )
    recorded = checkpoint_run(path).get("digest")
    if digest is not None and recorded != digest:
        raise RunFolderError(
            f"resume_from={resume_from!r} is a checkpoint of another run (different settings or data) or of an "
            "unrecorded one: resume from a checkpoint of this run, or start without resume_from."
        )
    return path


def expected_size(parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes a checkpoint will take: the trained weights plus the optimiser's state tensors (as they are now)."""
    total = sum(p.numel() * p.element_size() for p in parameters)
    for state in optimizer.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def prune(folder: str | os.PathLike, run_id: str, step: int, keep: int | None) -> list[Path]:
    """Delete run `run_id`'s checkpoints below `step` beyond the newest `keep` (counting the one at `step`)."""
    if keep is None:
        return []
    older = [path for path in list_checkpoints(folder, run_id) if checkpoint_step(path) < step]
    doomed = older[: max(0, len(older) - (keep - 1))]
    for path in doomed:
        remove(path)
    return doomed


def save_checkpoint(
    accelerator: Accelerator,
    folder: str | os.PathLike,
    step: int,
    keep: int | None,
    run: dict,
    size: int,
    losses: list[dict],
    mirror: str | os.PathLike | None = None,
) -> Path:
    """Save the training state at `step` atomically, then prune this run's older checkpoints beyond `keep`.

    Every process must call this (each writes its RNG state); only the main process checks the free space (`size`
    bytes expected), marks the checkpoint with `run` (`{"run_id", "digest"}`), adds the loss log up to `step` (so a
    resumed run's loss.csv is whole whatever happened to the run folder's), renames, prunes and mirrors.
    With `mirror`, the checkpoint is then copied there (atomically) and the mirror keeps only this newest one.
    """
    folder = Path(folder)
    final = folder / f"checkpoint-{step}"
    name = [temporary_name(final).name if accelerator.is_main_process else None]
    temporary = folder / broadcast_object_list(name)[0]  # every process writes into the main process's name
    if accelerator.is_main_process:
        check_free_space(folder, size, final.name)
        if mirror is not None:
            check_free_space(mirror, size, f"the copy of {final.name}")
    accelerator.wait_for_everyone()
    with undone_on_error(temporary, final.name):  # a full disk mid-write: no half checkpoint, a NoSpaceError
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / MARKER).write_text(json.dumps({**run, "step": step}) + "\n")
            write_loss_log(temporary / "loss.csv", losses)
            replace(temporary, final)
    if accelerator.is_main_process:
        prune(folder, run["run_id"], step, keep)
        if mirror is not None:
            copy_atomically(final, Path(mirror) / final.name)
            prune(mirror, run["run_id"], step, 1)
    accelerator.wait_for_everyone()
    return final
