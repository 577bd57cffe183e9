"""Pictures people look at: image grids and loss curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
