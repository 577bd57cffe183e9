"""Pictures people look at: image grids, loss curves, and the theory notebooks' figures (images, schedules, latents)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dreambooth_lib.schedule import NoiseSchedule


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


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The trailing mean of the last `window` values at each point (fewer at the start): the loss curves' smoothing."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def loss_curve(csv_or_rows, out_path) -> Path:
    """Plot a training loss log (loss.csv path, or rows of dicts with step/loss[/prior_loss]) to a PNG.

    The raw per-step loss is noisy (each step draws new timesteps), so a moving average is drawn over it. The figure is
    drawn without pyplot, so saving it needs no display and leaves the backend a notebook shows its figures with alone.
    """
    import csv

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if isinstance(csv_or_rows, (str, Path)):
        with Path(csv_or_rows).open(newline="") as file:
            rows = list(csv.DictReader(file))
    else:
        rows = list(csv_or_rows)
    if not rows:
        raise ValueError("loss_curve got an empty loss log.")
    steps = [int(float(row["step"])) for row in rows]
    figure = Figure(figsize=(6, 3.5))
    axis = figure.subplots()
    for column, colour in (("loss", "tab:blue"), ("prior_loss", "tab:orange")):
        values = [float(row[column]) for row in rows if column in row and row[column] not in ("", None)]
        if len(values) != len(steps) or all(math.isnan(value) for value in values):
            continue
        window = max(1, len(values) // 20)
        if window == 1:  # too few steps to smooth: the raw curve is the whole story
            axis.plot(steps, values, color=colour, label=column)
            continue
        smooth = moving_average(values, window)
        axis.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        axis.plot(steps, smooth, color=colour, label=f"{column} (mean of the last {window} steps)")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimiser steps are whole numbers
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("MSE loss")
    axis.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


# --------------------------------------------------------------------------------------------------------------------
# Notebook figures. They draw with pyplot, so Jupyter shows each figure once when the cell ends (end the call with `;`
# to keep the returned Figure from being shown a second time).


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A [3, H, W] (RGB) or [1, H, W] / [H, W] (grey) tensor in [-1, 1], the models' pixel range, as an 8-bit image."""
    if image.dim() == 3 and image.shape[0] == 1:
        image = image[0]
    if image.dim() not in (2, 3) or (image.dim() == 3 and image.shape[0] != 3):
        raise ValueError(f"tensor_to_pil takes [3, H, W], [1, H, W] or [H, W], got shape {tuple(image.shape)}.")
    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray((array.permute(1, 2, 0) if array.dim() == 3 else array).numpy())


def show_images(
    images: Sequence[torch.Tensor | Image.Image],
    titles: Sequence[str] | None = None,
    *,
    columns: int | None = None,
    size: float = 1.6,
    title: str | None = None,
) -> Figure:
    """Images (tensors in [-1, 1] or PIL images) in a grid of axes, each with its optional title."""
    import matplotlib.pyplot as plt

    if not len(images):
        raise ValueError("show_images got no images.")
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows + (0.4 if title else 0)))
    axes = [axes] if rows * columns == 1 else list(getattr(axes, "flat", axes))
    for index, axis in enumerate(axes):
        axis.axis("off")
        if index < len(images):
            picture = images[index] if isinstance(images[index], Image.Image) else tensor_to_pil(images[index])
            axis.imshow(picture, cmap="gray" if picture.mode == "L" else None, vmin=0, vmax=255)
            if titles is not None:
                axis.set_title(titles[index], fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_schedules(schedules: Mapping[str, NoiseSchedule]) -> Figure:
    """Three views of each noise schedule against the timestep t: beta_t, alpha-bar_t, and the signal-to-noise ratio.

    alpha-bar_t is the share of the clean signal's variance left in x_t (Ho et al. 2020, eq. 4); SNR(t) =
    alpha-bar_t / (1 - alpha-bar_t) is plotted on a log scale, where the schedules differ most.
    """
    import matplotlib.pyplot as plt

    figure, (beta_axis, alpha_axis, snr_axis) = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, schedule in schedules.items():
        timesteps = torch.arange(schedule.num_train_timesteps)
        beta_axis.plot(timesteps, schedule.betas, label=name)
        alpha_axis.plot(timesteps, schedule.alphas_cumprod, label=name)
        snr_axis.plot(timesteps, schedule.snr(timesteps), label=name)
    beta_axis.set(title="beta_t: variance of the noise added at step t", xlabel="t")
    alpha_axis.set(title="alpha-bar_t: signal variance left in x_t", xlabel="t", ylim=(0, 1.02))
    snr_axis.set(title="SNR(t) = alpha-bar_t / (1 - alpha-bar_t)", xlabel="t", yscale="log")
    for axis in (beta_axis, alpha_axis, snr_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_latent_channels(latents: torch.Tensor, title: str | None = None) -> Figure:
    """The channels of one latent [C, h, w] side by side, each on its own colour scale (latents are not pixels)."""
    import matplotlib.pyplot as plt

    if latents.dim() != 3:
        raise ValueError(f"plot_latent_channels takes one latent [C, h, w], got shape {tuple(latents.shape)}.")
    channels = latents.detach().float().cpu()
    figure, axes = plt.subplots(1, len(channels), figsize=(2.6 * len(channels), 2.6 + (0.4 if title else 0)))
    for index, (axis, channel) in enumerate(zip(getattr(axes, "flat", [axes]), channels, strict=True)):
        shown = axis.imshow(channel, cmap="RdBu_r")
        figure.colorbar(shown, ax=axis, fraction=0.046)
        axis.set_title(f"channel {index}", fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure
