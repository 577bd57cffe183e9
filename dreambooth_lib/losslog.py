"""The loss log of a run (`loss.csv`): one row per optimiser step, written atomically, read back after a crash, and
watched for losses that stopped being numbers.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth_lib.files import write_text_atomically
from dreambooth_lib.runs import RunError

if TYPE_CHECKING:
    from dreambooth_lib.config import TrainConfig

# `skipped` is 1 when the fp16 gradient scaler threw the step's update away (an inf/NaN gradient), else 0.
LOSS_COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "lr", "skipped")


class LossLogError(RunError):
    """loss.csv cannot be read; the message names the file, the line and what to do."""


class NonFiniteLossError(RunError):
    """Training stopped because the loss was NaN or infinite for several steps in a row."""


def write_loss_log(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write the rows (dicts with LOSS_COLUMNS) as CSV, replacing `path` whole (never a half-written file)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=LOSS_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({"skipped": 0, **row} for row in rows)
    return write_text_atomically(path, text.getvalue())


def _parse(row: dict, columns: list[str]) -> dict:
    values = {}
    for name in columns:
        values[name] = float(row[name])  # TypeError for a missing cell, ValueError for a broken one
    values["step"] = int(values["step"])
    values.setdefault("skipped", 0.0)
    values["skipped"] = int(values["skipped"])
    return values


def read_loss_log(path: str | os.PathLike, up_to: int | None = None) -> list[dict]:
    """The rows of a loss.csv (steps as int, the rest as float), those after step `up_to` dropped.

    A torn last line (the process died while an older version wrote the file in place) is dropped with the steps it
    would have held; a broken line anywhere else raises LossLogError naming the file and the line. A missing file is
    an empty log. Logs without the `skipped` column (older runs) read as no skipped steps.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    reader = csv.DictReader(lines)
    columns = [name for name in LOSS_COLUMNS if name in (reader.fieldnames or [])]
    if "step" not in columns or "loss" not in columns:
        raise LossLogError(
            f"{path} is not a loss log (its header is {lines[0] if lines else 'empty'!r}): move it away and resume."
        )
    rows = []
    for number, row in enumerate(reader, start=2):
        try:
            rows.append(_parse(row, columns))
        except (TypeError, ValueError) as error:
            if number == len(lines):
                break  # the torn last line: that step is trained again from the checkpoint
            raise LossLogError(
                f"{path} line {number} is broken ({error}): fix or delete that line, or move the file away to resume "
                "without the earlier loss history."
            ) from error
    return [row for row in rows if up_to is None or row["step"] <= up_to]


class NonFiniteWatch:
    """Stops a run whose loss is NaN or infinite for `config.max_nonfinite_steps` optimiser steps in a row.

    Call `check(row)` with each step's loss.csv row after the losses are averaged over processes, so every process
    takes the same decision. `failing` says whether the latest step's loss was non-finite (no checkpoint is saved then).
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.streak = 0

    @property
    def failing(self) -> bool:
        return self.streak > 0

    def check(self, row: dict) -> None:
        """Count the step; raise NonFiniteLossError once the streak reaches `max_nonfinite_steps`."""
        if math.isfinite(row["loss"]):
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.config.max_nonfinite_steps:
            raise NonFiniteLossError(self.message(row))

    def message(self, row: dict) -> str:
        config = self.config
        parts = ["instance_loss"] + (["prior_loss"] if config.with_prior_preservation else [])
        broken = ", ".join(f"{name}={row[name]}" for name in parts if not math.isfinite(row[name]))
        advice = "a learning_rate 10x smaller"
        if config.mixed_precision == "fp16":
            advice += ", or mixed_precision='bf16' (or 'no') if fp16 overflows"
        return (
            f"training stopped at step {row['step']}: the loss has not been a number for {self.streak} steps "
            f"({broken or 'loss=' + str(row['loss'])}) with learning_rate={config.learning_rate} and "
            f"mixed_precision={config.mixed_precision!r}. Nothing new was saved; try {advice}, and start again with "
            "overwrite=True or in a new output_dir."
        )
