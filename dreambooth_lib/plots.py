"""Pictures people look at: image grids and loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image


def image_grid(images: Sequence[Image.Image], columns: int | None = None, *, gap: int = 2) -> Image.Image:
    """Tile images (resized to the first one's size) into one picture, row by row, on a white background."""
    if not images:
        raise ValueError("image_grid got no images to tile.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB").resize((width, height)), (column * (width + gap), row * (height + gap)))
    return grid


def loss_curve(csv_or_rows, out_path) -> Path:
    """Plot a training loss log (loss.csv path, or rows of dicts with step/loss[/prior_loss]) to a PNG.

    The raw per-step loss is noisy (each step draws new timesteps), so a moving average is drawn over it.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    if isinstance(csv_or_rows, (str, Path)):
        with Path(csv_or_rows).open(newline="") as file:
            rows = list(csv.DictReader(file))
    else:
        rows = list(csv_or_rows)
    if not rows:
        raise ValueError("loss_curve got an empty loss log.")
    steps = [int(float(row["step"])) for row in rows]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for column, colour in (("loss", "tab:blue"), ("prior_loss", "tab:orange")):
        values = [float(row[column]) for row in rows if column in row and row[column] not in ("", None)]
        if len(values) != len(steps) or all(math.isnan(value) for value in values):
            continue
        window = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        axis.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        axis.plot(steps, smooth, color=colour, label=f"{column} (moving average of {window})")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("MSE loss")
    axis.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return out_path
