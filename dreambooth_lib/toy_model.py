"""A toy text-to-image model of handwritten digits: Stable Diffusion's classes at 16 px, trained from scratch on a CPU.

The same `UNet2DConditionModel`, CLIP text encoder, real CLIP tokenizer, `AutoencoderKL` and `StableDiffusionPipeline`
as the real thing, shrunk until they learn scikit-learn's 1,797 digits in a few minutes:

- the VAE has one level (no downsampling), so a 16 px image is a 16x16x4 latent: pixel space in all but name;
- the UNet has three levels (16, 8, 4 px) with cross-attention to the prompt at the two smaller ones;
- prompts are "a photo of the digit k", sometimes "a photo of a digit" (the class prompt DreamBooth needs) and
  sometimes "" (caption dropout, so the model also learns the unconditional score classifier-free guidance uses).

The trained weights ship in the package (`toy_weights/`, made by `scripts/build_toy_base.py`), so a lesson loads the
base in a second; `toy_components()` returns them as the library's usual `Components`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from dreambooth_lib.denoiser import Denoiser
from dreambooth_lib.losses import diffusion_loss
from dreambooth_lib.models import Components, tiny_components
from dreambooth_lib.schedule import NoiseSchedule
from dreambooth_lib.text import tokenize_prompt
from dreambooth_lib.toy import digit_images, warm_up_vae

TOY_WEIGHTS = Path(__file__).resolve().parent / "toy_weights"
RECORD_FILE = "record.json"
TOY_RESOLUTION = 16
CLASS_PROMPT = "a photo of a digit"
WEIGHT_FILES = ("text_encoder", "unet", "vae")


def digit_prompt(digit: int) -> str:
    """The prompt the toy learned for one digit class, e.g. "a photo of the digit 3"."""
    return f"a photo of the digit {digit}"


@dataclass(frozen=True)
class ToySettings:
    """Everything that decides the toy base's weights: the build script records it next to them."""

    seed: int = 0
    vae_steps: int = 150
    vae_images: int = 64
    steps: int = 1200
    batch_size: int = 48
    learning_rate: float = 2e-3
    class_prompt_fraction: float = 0.1  # "a photo of a digit": the class prompt of the DreamBooth lessons
    caption_dropout: float = 0.1  # "": the unconditional prompt of classifier-free guidance


# --------------------------------------------------------------------------------------------------------------------
# Architecture


def _toy_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # One level: no downsampling, so the latents keep every pixel of a 16 px digit.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TOY_RESOLUTION,
    )


def _toy_unet(cross_attention_dim: int, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TOY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def untrained_toy_components(seed: int = 0) -> Components:
    """The toy's architecture with random weights: the tiny CLIP text encoder and real tokenizer of
    `tiny_components`, a one-level VAE and a three-level UNet for 16 px digits."""
    base = tiny_components("sd", seed=seed)
    hidden = base.text_encoder.config.hidden_size
    return replace(base, source="toy", vae=_toy_vae(seed + 2), unet=_toy_unet(hidden, seed + 3))


# --------------------------------------------------------------------------------------------------------------------
# Training the base


def digit_pixels(size: int = TOY_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as RGB pixels [N, 3, size, size] in [-1, 1] (grey: the channels are equal), and labels."""
    from sklearn.datasets import load_digits

    return digit_images(size).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(load_digits().target)


def caption(label: int, draw: float, settings: ToySettings) -> str:
    """The caption of one training image: its digit, the class prompt, or nothing, by the settings' fractions."""
    if draw < settings.caption_dropout:
        return ""
    if draw < settings.caption_dropout + settings.class_prompt_fraction:
        return CLASS_PROMPT
    return digit_prompt(label)


def _fit_latent_scale(components: Components, pixels: torch.Tensor) -> None:
    """Set the VAE's scaling_factor to 1/std of its latents, as Stable Diffusion did (Rombach et al. 2022, G)."""
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mean
    components.vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))


def train_toy_vae(settings: ToySettings = ToySettings(), *, steps: int | None = None, progress: bool = True):
    """Stage 1: the VAE learns to reconstruct a few digits (and their mirror images), then is frozen in float16
    precision, the precision it ships in, so the UNet trains on exactly the latents the shipped VAE gives.

    Returns (components with the trained VAE, the VAE's losses). `steps` stops early (tests check the first steps).
    """
    components = untrained_toy_components(settings.seed)
    pixels, _ = digit_pixels()
    subset = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(settings.seed))[: settings.vae_images]
    losses = warm_up_vae(
        components.vae, pixels[subset], steps=steps or settings.vae_steps, seed=settings.seed, progress=progress
    )
    components.vae.to(torch.float16).to(torch.float32).requires_grad_(False)
    _fit_latent_scale(components, pixels[subset])
    return components, losses


def train_toy_unet(
    components: Components, settings: ToySettings = ToySettings(), *, steps: int | None = None, progress: bool = True
) -> list[float]:
    """Stage 2: UNet and text encoder learn together to denoise digit latents under their captions, with the
    DreamBooth library's own loss (`train.diffusion_loss`, no prior term). Trains `components` in place; returns the
    loss per step. `steps` stops early (the schedule stays that of the full run, so the first steps match it)."""
    pixels, labels = digit_pixels()
    with torch.no_grad():
        moments = components.vae.encode(pixels).latent_dist
    scale = components.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(settings.seed + 1)
    denoiser = Denoiser(components, train_text_encoder=True)
    schedule = NoiseSchedule.from_config(components.noise_scheduler.config)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.learning_rate, total_steps=settings.steps, pct_start=0.05
    )
    losses = []
    denoiser.train()
    for _ in tqdm(range(steps or settings.steps), desc="training the toy", disable=not progress):
        index = torch.randint(0, len(pixels), (settings.batch_size,), generator=generator)
        draws = torch.rand(settings.batch_size, generator=generator).tolist()
        prompts = [caption(int(labels[i]), draw, settings) for i, draw in zip(index, draws, strict=True)]
        # A fresh sample of q(z | x) each time, as the DreamBooth scripts train.
        latent_noise = torch.randn(moments.mean[index].shape, generator=generator)
        latents = (moments.mean[index] + moments.std[index] * latent_noise) * scale
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (settings.batch_size,), generator=generator)
        parts = diffusion_loss(
            denoiser, schedule, latents, tokenize_prompt(components, prompts), noise, timesteps, with_prior=False
        )
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(parts.total.item())
    for module in (components.unet, components.text_encoder):
        module.requires_grad_(False).eval()
    return losses


# --------------------------------------------------------------------------------------------------------------------
# The shipped weights


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_toy_weights(components: Components, folder: str | os.PathLike, record: dict) -> Path:
    """Write the three trained modules (fp16 safetensors + config) and `record.json` with their hashes."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        module = getattr(components, name)
        module.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
        module.to(torch.float32)
    hashes = {str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.glob("*/*.safetensors"))}
    (folder / RECORD_FILE).write_text(json.dumps(record | {"sha256": hashes}, indent=2) + "\n")
    return folder


def toy_record(folder: str | os.PathLike = TOY_WEIGHTS) -> dict:
    """The build script's record of the shipped weights: settings, first losses, metrics and file hashes."""
    return json.loads((Path(folder) / RECORD_FILE).read_text())


def toy_components(folder: str | os.PathLike = TOY_WEIGHTS) -> Components:
    """The trained toy base as `Components` (float32, CPU, eval mode), for `build_pipeline` or `save_components`."""
    folder = Path(folder)
    if not (folder / RECORD_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} holds no toy weights: rebuild them with `python scripts/build_toy_base.py --out {folder}`."
        )
    components = untrained_toy_components(toy_record(folder)["settings"]["seed"])
    weights = dict(torch_dtype=torch.float32, use_safetensors=True)
    components.text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **weights).eval()
    components.vae = AutoencoderKL.from_pretrained(folder / "vae", **weights).eval()
    components.unet = UNet2DConditionModel.from_pretrained(folder / "unet", **weights).eval()
    return components
