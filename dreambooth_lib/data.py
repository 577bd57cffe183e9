"""Instance and class image folders -> checked, transformed tensors, and a cache of their VAE latents.

DreamBooth (Ruiz et al. 2023) fine-tunes on a handful of photos of one subject (the *instance* images, captioned with
a prompt holding a rare identifier, "a photo of sks dog") and, for prior preservation, on images the frozen model made
of the subject's class ("a photo of a dog"). This module turns both folders into training batches:

1. `check_folder` opens and fully decodes every file before any model loads, so a bad file is named early;
2. `load_image` reads any image Pillow opens as an upright sRGB-like RGB picture (alpha on white, EXIF rotation, first
   frame, 16-bit and float data scaled, not clipped);
3. `DreamBoothDataset` resizes the shorter side to the resolution, crops, optionally flips, and scales to [-1, 1];
4. `collate_examples` puts instance examples first and class examples second, the order `dreambooth_loss` expects;
5. `LatentCache` runs the VAE once per image (and per flip) so the training loop never does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
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

    def raise_for_problems(self) -> None:
        """Raise a DataError listing every refused file (and folder problem); do nothing when the folder is ok."""
        if not self.ok:
            raise DataError(f"{self.folder} cannot be used for training:\n  - " + "\n  - ".join(self.problems()))


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


def check_file(path: Path, resolution: int | None = None) -> FileCheck:
    """Decode one file and say whether training can use it (see `check_folder`)."""
    try:
        loaded = _open(path)
    except DataError as error:
        return FileCheck(path, None, None, "refused", str(error))
    size = loaded.image.size
    note = ", ".join(loaded.notes)
    if resolution is not None and min(size) < resolution:
        upscale = f"shorter side {min(size)} px < resolution {resolution} px: it will be upscaled and look soft; "
        note = upscale + "use a larger original if you have one" + (f" ({note})" if note else "")
        return FileCheck(path, size, loaded.mode, "warning", note)
    return FileCheck(path, size, loaded.mode, "ok", note)


def check_folder(folder: str | os.PathLike, resolution: int | None = None, *, progress: bool = True) -> FolderReport:
    """Open and fully decode every image in `folder` (not its subfolders) before any model loads.

    Refused: a missing or empty folder, zero-byte files, files that are not images, truncated or corrupt images.
    Warned (still used): images whose shorter side is below `resolution`, since upscaling blurs them.
    Skipped: hidden files (.DS_Store, ._* resource forks), captions and metadata (.txt, .json, .jsonl, ...), folders.
    """
    folder = Path(folder)
    if not folder.exists():
        return FolderReport(folder, resolution, [], f"{folder} does not exist: check the path (or create it)")
    if not folder.is_dir():
        return FolderReport(folder, resolution, [], f"{folder} is a file, not a folder: pass the folder holding it")
    rows = []
    for path in tqdm(sorted(folder.iterdir()), desc=f"checking {folder.name}", disable=not progress, leave=False):
        reason = _skip_reason(path)
        rows.append(FileCheck(path, None, None, "skipped", reason) if reason else check_file(path, resolution))
    report = FolderReport(folder, resolution, rows)
    if not report.usable and not report.refused:
        found = ", ".join(row.file.name for row in rows) or "nothing"
        report.folder_problem = f"{folder} holds no images (found: {found}): add JPEG or PNG images to it"
    return report


# --------------------------------------------------------------------------------------------------------------------
# Transforms: resize the shorter side, crop, flip, scale to [-1, 1]


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is exactly `resolution` px, keeping the aspect ratio (Lanczos resampling)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def crop_square(image: Image.Image, resolution: int, *, center: bool = True) -> Image.Image:
    """A `resolution`-sized square: the centre, or a uniformly random position (drawn from torch's RNG)."""
    width, height = image.size
    if center:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = int(torch.randint(0, width - resolution + 1, ()))
        top = int(torch.randint(0, height - resolution + 1, ()))
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB picture -> float32 tensor [3, H, W] in [-1, 1], the range the VAE was trained on."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_pixels(path: Path, resolution: int, *, center_crop: bool = True, flip: bool = False) -> torch.Tensor:
    """One file through the whole transform: load, resize, crop, flip (after cropping), scale."""
    image = crop_square(resize_shorter_side(load_image(path), resolution), resolution, center=center_crop)
    pixels = to_tensor(image)
    return pixels.flip(-1) if flip else pixels


# --------------------------------------------------------------------------------------------------------------------
# The dataset and its collate function


def _checked_images(folder: str | os.PathLike, resolution: int, role: str) -> list[Path]:
    report = check_folder(folder, resolution)
    try:
        report.raise_for_problems()
    except DataError as error:
        raise DataError(f"{role} folder: {error}") from error
    if report.warnings:
        listed = ", ".join(f"{row.file.name} ({row.size[0]}x{row.size[1]})" for row in report.warnings)
        warnings.warn(
            f"{role} folder {report.folder}: {len(report.warnings)} image(s) smaller than {resolution} px will be "
            f"upscaled and look soft: {listed}",
            UserWarning,
            stacklevel=3,
        )
    return report.usable


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and, for prior preservation, class images) as training examples.

    Example `i` pairs instance image `i mod n_instance` with class image `i mod n_class`, so one pass (of
    `max(n_instance, n_class)` examples) shows every image of both folders at least once.
    Both folders are checked (every file decoded) when the dataset is built; the first bad file raises DataError.
    """

    def __init__(
        self,
        instance_dir: str | os.PathLike,
        instance_prompt: str,
        resolution: int = 512,
        class_dir: str | os.PathLike | None = None,
        class_prompt: str | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
    ) -> None:
        if not isinstance(resolution, int) or resolution < 8:
            raise DataError(f"resolution={resolution!r}: use a whole number of pixels, at least 8 (e.g. 512)")
        if not instance_prompt:
            raise DataError("instance_prompt is empty: name the subject with its identifier, e.g. 'a photo of sks dog'")
        if class_dir is not None and not class_prompt:
            raise DataError(f"class_dir={class_dir} needs a class_prompt, e.g. 'a photo of a dog'")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.instance_prompt = instance_prompt
        self.instance_images = _checked_images(instance_dir, resolution, "instance")
        self.class_prompt = class_prompt if class_dir is not None else None
        self.class_images = _checked_images(class_dir, resolution, "class") if class_dir is not None else []

    @property
    def with_prior(self) -> bool:
        return bool(self.class_images)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def pixels(self, path: Path, flip: bool = False) -> torch.Tensor:
        """The [3, R, R] tensor of one file under this dataset's resize and crop."""
        return image_pixels(path, self.resolution, center_crop=self.center_crop, flip=flip)

    def draw_flip(self) -> bool:
        """Whether to flip the next image: a fair coin from torch's RNG when random_flip is on, else never."""
        return self.random_flip and bool(torch.rand(()) < 0.5)

    def __getitem__(self, index: int) -> dict:
        path = self.instance_images[index % len(self.instance_images)]
        example = {"instance_pixels": self.pixels(path, self.draw_flip()), "instance_prompt": self.instance_prompt}
        if self.with_prior:
            path = self.class_images[index % len(self.class_images)]
            example |= {"class_pixels": self.pixels(path, self.draw_flip()), "class_prompt": self.class_prompt}
        return example


def collate_examples(examples: list[dict]) -> dict:
    """Stack examples into one batch: all instance examples first, then all class examples.

    Returns {"pixel_values" or "latents": Tensor[B or 2B, ...], "prompts": list[str] in the same order,
    "with_prior": bool}. With prior preservation the batch's first half is instance, the second half class: the split
    `dreambooth_loss` relies on.
    """
    if not examples:
        raise DataError("collate_examples got no examples: the dataset is empty")
    kind, key = ("latents", "latents") if "instance_latents" in examples[0] else ("pixels", "pixel_values")
    with_prior = f"class_{kind}" in examples[0]
    if any((f"class_{kind}" in example) != with_prior for example in examples):
        raise DataError("collate_examples got a mix of examples with and without class images")
    roles = ("instance", "class") if with_prior else ("instance",)
    tensors = [example[f"{role}_{kind}"] for role in roles for example in examples]
    prompts = [example[f"{role}_prompt"] for role in roles for example in examples]
    return {key: torch.stack(tensors).float(), "prompts": prompts, "with_prior": with_prior}


# --------------------------------------------------------------------------------------------------------------------
# Latents: the VAE encoder, run once


def _scale_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """Map VAE latents into the space the UNet was trained on (the inverse of what the pipelines do before decoding).

    SD 1.x/2.x/SDXL: z * scaling_factor (Rombach et al. 2022, sec. 4.3.2 / appendix G: unit variance latents);
    VAEs with a shift (SD3/Flux style) subtract it first; VAEs with per-channel latents_mean/std (the SDXL
    pipeline's convention) standardise per channel.
    """
    config = vae_config
    scale = config.scaling_factor
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, dtype=latents.dtype, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) * scale / std
    shift = getattr(config, "shift_factor", None)
    return (latents - shift) * scale if shift is not None else latents * scale


@torch.no_grad()
def latent_moments(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's diagonal Gaussian q(z | x), unscaled, float32 on the VAE's device.

    `pixel_values` ([B, 3, H, W] in [-1, 1]) is moved to the VAE's device and dtype.
    """
    parameter = next(vae.parameters())
    distribution = vae.encode(pixel_values.to(parameter.device, parameter.dtype)).latent_dist
    mean, std = distribution.mean.float(), distribution.std.float()
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise DataError(
            f"the VAE produced NaN/inf latents in {parameter.dtype}: encode in float32, or for SDXL in float16 use "
            "the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix)"
        )
    return mean, std


def sample_latents(
    vae_config, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mean + std * noise (the reparameterisation, Kingma & Welling 2014), scaled for the UNet by `vae.config`."""
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return _scale_latents(vae_config, mean + std * noise)


def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/8, W/8] (float32, VAE's device), a sample of q(z | x).

    Sampling rather than taking the mean is what the DreamBooth training scripts do; it is a little extra
    augmentation. `LatentCache` stores mean and std instead of one sample so it keeps drawing fresh samples.
    """
    mean, std = latent_moments(vae, pixel_values)
    return sample_latents(vae.config, mean, std, generator)


# Pixels per VAE call when caching latents: the encoder's transient memory grows with them (SDXL at 1024 px, four
# images per call made the process peak of the T4 recipe, 12.6 GiB on a 2026-11-29 H200 run, far above its loop's).
ENCODE_PIXELS = 4 * 512 * 512


class LatentCache(torch.utils.data.Dataset):
    """A `DreamBoothDataset` with every image already encoded by the VAE: the training loop never runs the VAE.

    Each image is encoded once, and once more flipped when the dataset flips; the cache keeps the mean and std of
    q(z | x) and draws a fresh sample per access, so training sees the same distribution as without the cache.
    Items mirror the dataset's with "instance_latents"/"class_latents" in place of pixels; use `collate_examples`.
    """

    def __init__(
        self,
        dataset: DreamBoothDataset,
        vae_config,
        instance_moments: list[tuple[torch.Tensor, torch.Tensor]],
        class_moments: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.dataset = dataset
        self.vae_config = vae_config  # only the scaling is needed after encoding (and it pickles into workers)
        # moments[k] = (mean, std), each [F, C, h, w] with F = 2 (unflipped, flipped) when the dataset flips, else 1.
        self.instance_moments = instance_moments
        self.class_moments = class_moments

    @classmethod
    def build(
        cls,
        dataset: DreamBoothDataset,
        vae,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LatentCache:
        """Encode every instance and class image of `dataset` (and their flips when it flips), batched.

        `batch_size`: images per VAE call (default: `ENCODE_PIXELS` worth, so 4 at 512 px and 1 at 1024 px).
        `device`/`dtype`: where the VAE runs (default: where it already is); the VAE is moved there and left there.
        """
        batch_size = batch_size or max(1, ENCODE_PIXELS // dataset.resolution**2)
        if not dataset.center_crop:
            raise DataError(
                "LatentCache needs center_crop=True: random crops change every step, so their latents cannot be "
                "computed once. Use centre crops with the cache, or train without the cache."
            )
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: use 1 or more")
        if device is not None or dtype is not None:
            vae.to(device=device, dtype=dtype)
        vae.eval()
        flips = (False, True) if dataset.random_flip else (False,)
        jobs = [(path, flip) for path in [*dataset.instance_images, *dataset.class_images] for flip in flips]
        means, stds = [], []
        for start in tqdm(range(0, len(jobs), batch_size), desc="encoding latents", unit="batch", leave=False):
            batch = torch.stack([dataset.pixels(path, flip) for path, flip in jobs[start : start + batch_size]])
            mean, std = latent_moments(vae, batch)
            means.append(mean.cpu())  # the cache lives in CPU memory; the data loader moves each batch
            stds.append(std.cpu())
        mean = torch.cat(means).unflatten(0, (-1, len(flips)))
        std = torch.cat(stds).unflatten(0, (-1, len(flips)))
        moments = list(zip(mean, std, strict=True))
        split = len(dataset.instance_images)
        return cls(dataset, vae.config, moments[:split], moments[split:])

    def __len__(self) -> int:
        return len(self.dataset)

    def _latents(self, moments: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = moments
        flip = int(self.dataset.draw_flip())
        return sample_latents(self.vae_config, mean[flip : flip + 1], std[flip : flip + 1])[0]

    def __getitem__(self, index: int) -> dict:
        data = self.dataset
        example = {
            "instance_latents": self._latents(self.instance_moments[index % len(self.instance_moments)]),
            "instance_prompt": data.instance_prompt,
        }
        if data.with_prior:
            example |= {
                "class_latents": self._latents(self.class_moments[index % len(self.class_moments)]),
                "class_prompt": data.class_prompt,
            }
        return example
