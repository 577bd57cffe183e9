"""Checked pictures -> training examples: transforms, the instance/class dataset, and a cache of VAE latents.

DreamBooth (Ruiz et al. 2023) fine-tunes on a handful of photos of one subject (the *instance* images, captioned with
a prompt holding a rare identifier, "a photo of sks dog") and, for prior preservation, on images the frozen model made
of the subject's class ("a photo of a dog"). This module turns both folders into training batches:

1. `DreamBoothDataset` takes the pictures `images.check_folder` decoded, crops (centre or random), optionally flips,
   and scales to [-1, 1];
2. `collate_examples` puts instance examples first and class examples second, the order `dreambooth_loss` expects;
3. `LatentCache` runs the VAE once per image (and per flip) so the training loop never does;
4. `SeededExamples` keys each example's random draws to (seed, epoch, index), so a resumed run repeats them.

Reading and checking image files is `dreambooth_lib.images`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dreambooth_lib.families import SDXL_FP16_VAE
from dreambooth_lib.images import DataError, FolderReport, check_folder, load_image, resize_shorter_side

# --------------------------------------------------------------------------------------------------------------------
# Transforms: crop, flip, scale to [-1, 1] (resizing the shorter side is `images.resize_shorter_side`)


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


def _checked_pictures(source: str | os.PathLike | FolderReport, resolution: int, role: str) -> dict[Path, Image.Image]:
    """The usable pictures of a folder, decoded once: from the report of `check_folder(..., keep_images=True)` when
    given one made at this resolution, else by checking the folder now."""
    report = source if isinstance(source, FolderReport) else None
    if report is None or report.resolution != resolution or (report.usable and not report.images):
        report = check_folder(report.folder if report else source, resolution, keep_images=True)
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
    return report.images


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and, for prior preservation, class images) as training examples.

    Example `i` pairs instance image `i mod n_instance` with class image `i mod n_class`, so one pass (of
    `max(n_instance, n_class)` examples) shows every image of both folders at least once.
    Each folder is given as its path, or as the report `images.check_folder(folder, resolution, keep_images=True)`
    made of it (so no file is decoded twice). Either way it is checked; the first bad file raises DataError.
    """

    def __init__(
        self,
        instance_dir: str | os.PathLike | FolderReport,
        instance_prompt: str,
        resolution: int = 512,
        class_dir: str | os.PathLike | FolderReport | None = None,
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
        # path -> picture, scaled so its shorter side is the resolution (the first step of the transform).
        self.pictures = _checked_pictures(instance_dir, resolution, "instance")
        self.instance_images = list(self.pictures)
        self.class_prompt = class_prompt if class_dir is not None else None
        self.class_images = []
        if class_dir is not None:
            class_pictures = _checked_pictures(class_dir, resolution, "class")
            self.pictures |= class_pictures
            self.class_images = list(class_pictures)

    @property
    def with_prior(self) -> bool:
        return bool(self.class_images)

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def pixels(self, path: Path, flip: bool = False) -> torch.Tensor:
        """The [3, R, R] tensor of one of the dataset's files: crop, flip (after cropping), scale."""
        pixels = to_tensor(crop_square(self.pictures[path], self.resolution, center=self.center_crop))
        return pixels.flip(-1) if flip else pixels

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


class SeededExamples(torch.utils.data.Dataset):
    """A dataset whose random draws (latent samples, flips) depend only on (seed, epoch, index), not on the global RNG.

    The data loader fetches one batch ahead, so draws from the global RNG would interleave with the noise draws in an
    order that a resumed run cannot repeat; keyed draws make the resumed batches equal to the uninterrupted ones.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1_000_003 * self.epoch + index)
            return self.dataset[index]


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
            f"the fp16-fix VAE ({SDXL_FP16_VAE})"
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
