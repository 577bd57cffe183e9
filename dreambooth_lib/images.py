"""Image files -> upright RGB pictures, and folder checks that name every file training cannot use.

1. `load_image` reads any image Pillow opens as an upright sRGB-like RGB picture (alpha on white, EXIF rotation, first
   frame, 16-bit and float data scaled, not clipped);
2. `check_folder` opens and fully decodes every file before any model loads, so a bad file is named early; asked to
   keep them, it hands the decoded pictures on (scaled to the training resolution), so a run decodes each file once.

The dataset built from these pictures is in `dreambooth_lib.data`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

# Files that sit beside training images but are not images: captions and metadata written by people and by class-image
# generation, and the operating systems' own bookkeeping. They are listed as skipped, never opened.
SIDECAR_SUFFIXES = frozenset({".txt", ".caption", ".json", ".jsonl", ".csv", ".md", ".yaml", ".yml", ".toml"})
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
WHITE = (255, 255, 255)
EXIF_ORIENTATION = 0x0112


class DataError(ValueError):
    """An instance/class folder or one of its files cannot be used; the message names it and the fix."""


# --------------------------------------------------------------------------------------------------------------------
# Reading one image


@dataclass
class LoadedImage:
    """An image ready for training, with what was found in the file and what was done to it."""

    image: Image.Image  # RGB, upright
    mode: str  # the mode Pillow opened, before conversion
    notes: list[str] = field(default_factory=list)


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make Pillow raise on truncated files even if some other code relaxed it globally."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transparent pixels become white: the model never sees alpha, and black (what dropping alpha gives) is worse."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _integer_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (I;16*) and 32-bit integer (I, what 16-bit PNG/TIFF can open as) grayscale: scale 0..65535 to 0..255.

    Pillow's own conversion clips at 255, which turns most of a 16-bit photo white.
    """
    values = np.asarray(image).astype(np.float64)
    eight_bit = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def _float_to_rgb(image: Image.Image) -> Image.Image:
    """32-bit float grayscale: [0, 1] when every value fits there (the usual float convention), else [0, 255]."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    eight_bit = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit, mode="L").convert("RGB")


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """CIELAB needs a colour-managed transform; Pillow's plain conversion treats L, a, b as if they were R, G, B."""
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(image, transform)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Convert any Pillow mode to RGB; returns the image and a note saying what was done (None when nothing)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, None
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        if mode == "La":  # premultiplied: Pillow converts it only via LA
            image = image.convert("LA")
        return _composite_on_white(image), "transparency composited on white"
    if mode.startswith("I;16") or mode == "I":
        return _integer_to_rgb(image), f"{mode} (16-bit range) scaled to 8 bits"
    if mode == "F":
        return _float_to_rgb(image), "float values scaled to 8 bits"
    if mode == "LAB":
        return _lab_to_rgb(image), "CIELAB converted to sRGB"
    try:
        return image.convert("RGB"), None if mode in ("L", "1", "P", "RGBX") else f"{mode} converted to RGB"
    except ValueError as error:
        raise DataError(f"mode {mode} cannot be converted to RGB ({error})") from error


def _open(path: Path) -> LoadedImage:
    """Open, verify and fully decode one file; raises DataError with the reason and the fix (without the path)."""
    if not path.is_file():
        raise DataError("not a readable file (a broken link?): replace it with the image itself or delete it")
    if path.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes), probably an interrupted copy: copy it again or delete it")
    with _strict_decoding():
        try:
            # verify() checks the container (e.g. PNG chunk checksums) without decoding; the file is reopened after.
            with Image.open(path) as probe:
                probe.verify()
            with Image.open(path) as opened:
                frames = getattr(opened, "n_frames", 1)
                opened.seek(0)
                mode = opened.mode
                # load() decodes every pixel: the only way to find truncated or corrupt image data.
                opened.load()
                rotated = opened.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
                image, conversion = _to_rgb(ImageOps.exif_transpose(opened))
                image.load()
        except DataError:
            raise
        except UnidentifiedImageError as error:
            hint = " (HEIC/HEIF photos: export them as JPEG)" if path.suffix.lower() in (".heic", ".heif") else ""
            raise DataError(
                f"not an image Pillow can read{hint}: move it out of the folder, or convert it to JPEG or PNG"
            ) from error
        except Image.DecompressionBombError as error:
            raise DataError(f"too large to open safely ({error}): downscale it first") from error
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DataError(
                f"corrupt or truncated image data ({error}): re-export or re-copy it, or delete it"
            ) from error
    notes = [note for note in (conversion,) if note]
    if rotated:
        notes.append("EXIF orientation applied")
    if frames > 1:
        notes.append(f"first of {frames} frames used")
    return LoadedImage(image=image, mode=mode, notes=notes)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright RGB picture, whatever its mode, orientation tag or number of frames.

    Handles RGB, L, 1, P (with or without transparency), LA, RGBA (composited on white), CMYK, YCbCr, HSV, LAB,
    16-bit and 32-bit integer and float grayscale (scaled, not clipped); applies the EXIF orientation; reads
    multi-frame files (MPO from cameras and phones, animated GIF/PNG/WebP) as their first frame.

    Raises:
        DataError: naming the file, what is wrong with it and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file: check the path")
    try:
        return _open(path).image
    except DataError as error:
        raise DataError(f"{path}: {error}") from error


# --------------------------------------------------------------------------------------------------------------------
# Checking a folder


@dataclass(frozen=True)
class FileCheck:
    """One row of a folder report."""

    file: Path
    size: tuple[int, int] | None  # width, height after EXIF rotation
    mode: str | None  # as found in the file
    verdict: str  # "ok", "warning", "refused" or "skipped"
    note: str = ""
    # The decoded picture, when the check was asked to keep it: RGB, upright, shorter side = the resolution (if given).
    image: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def usable(self) -> bool:
        return self.verdict in ("ok", "warning")


@dataclass
class FolderReport:
    """What `check_folder` found: one row per file, and whether the folder can be trained on."""

    folder: Path
    resolution: int | None
    rows: list[FileCheck]
    folder_problem: str | None = None  # missing, not a folder, or no images at all

    @property
    def usable(self) -> list[Path]:
        """The images training will read (ok and warned ones), in name order."""
        return [row.file for row in self.rows if row.usable]

    @property
    def images(self) -> dict[Path, Image.Image]:
        """The usable files' decoded pictures, in name order (empty unless the check kept them)."""
        return {row.file: row.image for row in self.rows if row.usable and row.image is not None}

    @property
    def refused(self) -> list[FileCheck]:
        return [row for row in self.rows if row.verdict == "refused"]

    @property
    def warnings(self) -> list[FileCheck]:
        return [row for row in self.rows if row.verdict == "warning"]

    @property
    def ok(self) -> bool:
        """True when the folder has images and no file was refused (warnings are fine)."""
        return self.folder_problem is None and not self.refused

    def table(self) -> str:
        """A plain-text table: file, size, mode, verdict (with the reason or what was done)."""
        header = ("file", "size", "mode", "verdict")
        lines = [
            (
                row.file.name,
                f"{row.size[0]}x{row.size[1]}" if row.size else "-",
                row.mode or "-",
                f"{row.verdict}: {row.note}" if row.note else row.verdict,
            )
            for row in self.rows
        ]
        widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(3)]
        text = ["  ".join(cells[i].ljust(widths[i]) for i in range(3)) + "  " + cells[3] for cells in [header, *lines]]
        verdict = "usable" if self.ok else "NOT usable"
        summary = f"{self.folder}: {len(self.usable)} usable image(s), {len(self.refused)} refused -> {verdict}"
        if self.folder_problem:
            summary += f"\n{self.folder_problem}"
        return "\n".join([*text, summary])

    def problems(self) -> list[str]:
        """One message per problem, each naming the folder or file and the fix."""
        messages = [self.folder_problem] if self.folder_problem else []
        messages += [f"{row.file}: {row.note}" for row in self.refused]
        return messages

    def raise_for_problems(self, setting: str | None = None) -> None:
        """Raise a DataError listing every refused file (and folder problem); do nothing when the folder is ok.

        `setting`: the name the user gave the folder under (e.g. "instance_dir"), put first in the message.
        """
        if self.ok:
            return
        prefix = f"{setting}: " if setting else ""
        problems = self.problems()
        if len(problems) == 1 and self.folder_problem:  # missing, not a folder, no images: one line
            raise DataError(prefix + self.folder_problem)
        raise DataError(f"{prefix}{self.folder} cannot be used for training:\n  - " + "\n  - ".join(problems))


def _skip_reason(path: Path) -> str | None:
    if path.is_dir():
        return "folder (subfolders are not read)"
    if path.name.startswith("."):
        return "hidden file"
    if path.name.lower() in SYSTEM_FILES:
        return "system file"
    if path.suffix.lower() in SIDECAR_SUFFIXES:
        return "caption/metadata sidecar"
    return None


def check_file(path: Path, resolution: int | None = None, *, keep_image: bool = False) -> FileCheck:
    """Decode one file and say whether training can use it (see `check_folder`)."""
    try:
        loaded = _open(path)
    except DataError as error:
        return FileCheck(path, None, None, "refused", str(error))
    size = loaded.image.size
    note = ", ".join(loaded.notes)
    image = None
    if keep_image:  # scaled now, so a folder of large photos is not held in memory at full size
        image = resize_shorter_side(loaded.image, resolution) if resolution is not None else loaded.image
    if resolution is not None and min(size) < resolution:
        upscale = f"shorter side {min(size)} px < resolution {resolution} px: it will be upscaled and look soft; "
        note = upscale + "use a larger original if you have one" + (f" ({note})" if note else "")
        return FileCheck(path, size, loaded.mode, "warning", note, image)
    return FileCheck(path, size, loaded.mode, "ok", note, image)


def check_folder(
    folder: str | os.PathLike, resolution: int | None = None, *, progress: bool = True, keep_images: bool = False
) -> FolderReport:
    """Open and fully decode every image in `folder` (not its subfolders) before any model loads.

    Refused: a missing or empty folder, zero-byte files, files that are not images, truncated or corrupt images.
    Warned (still used): images whose shorter side is below `resolution`, since upscaling blurs them.
    Skipped: hidden files (.DS_Store, ._* resource forks), captions and metadata (.txt, .json, .jsonl, ...), folders.
    `keep_images`: keep each usable picture (`FolderReport.images`), so training need not decode the files again.
    """
    folder = Path(folder)
    if not folder.exists():
        return FolderReport(folder, resolution, [], f"{folder} does not exist: check the path (or create it)")
    if not folder.is_dir():
        return FolderReport(folder, resolution, [], f"{folder} is a file, not a folder: pass the folder holding it")
    paths = sorted(folder.iterdir())
    reasons = {path: _skip_reason(path) for path in paths}
    candidates = [path for path in paths if reasons[path] is None]  # the progress bar counts images, not sidecars
    checked = {
        path: check_file(path, resolution, keep_image=keep_images)
        for path in tqdm(candidates, desc=f"checking {folder.name}", unit="image", disable=not progress, leave=False)
    }
    rows = [checked.get(path) or FileCheck(path, None, None, "skipped", reasons[path]) for path in paths]
    report = FolderReport(folder, resolution, rows)
    if not report.usable and not report.refused:
        found = ", ".join(row.file.name for row in rows) or "nothing"
        report.folder_problem = f"{folder} holds no images (found: {found}): add JPEG or PNG images to it"
    return report


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is exactly `resolution` px, keeping the aspect ratio (Lanczos resampling)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
