"""Small experiments trained from scratch, so the theory notebooks can show learning happen instead of describing it.

- A pixel-space denoiser (diffusers' `UNet2DModel` with a tiny config) trained on scikit-learn's handwritten digits
  with the library's noise schedule and loss: notebook 02 samples from it with our DDPM and DDIM steps.
- A short warm-up of the tiny VAE on the sample photos: random weights reconstruct nothing, and notebook 03 watches
  the reconstructions appear.

Both run in about a minute on a laptop CPU at their default sizes; on a GPU the notebooks train them longer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DModel
from tqdm.auto import tqdm

from dreambooth_lib.data import check_folder, image_pixels
from dreambooth_lib.losses import diffusion_target
from dreambooth_lib.schedule import NoiseSchedule

# --------------------------------------------------------------------------------------------------------------------
# Digits and a denoiser for them


def digit_images(size: int = 16) -> torch.Tensor:
    """scikit-learn's 1,797 handwritten digits (8x8, ink 0..16), upscaled to `size` px: float32 [N, 1, size, size].

    Values are scaled to [-1, 1] (background -1), the range diffusion models expect of pixels.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships the digits: no download

    if size < 8 or size % 4:
        raise ValueError(f"size={size}: use a multiple of 4 that is at least 8 (the denoiser halves it twice).")
    digits = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    upscaled = F.interpolate(digits, size=(size, size), mode="bilinear", align_corners=False)
    return upscaled.clamp(0, 1) * 2 - 1


def digit_denoiser(size: int = 16, channels: Sequence[int] = (16, 32, 64), seed: int = 0) -> UNet2DModel:
    """A small UNet that predicts the noise in a one-channel `size`-px image: no attention, one ResNet per level.

    `channels` gives the width of each level; each level after the first halves the resolution.
    """
    torch.manual_seed(seed)
    levels = len(channels)
    return UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
    )


def train_denoiser(
    model: UNet2DModel,
    images: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `model` to predict the schedule's target (noise, or v) from noised `images`; returns the loss per step.

    The DDPM objective (Ho et al. 2020, eq. 14): draw x0, a timestep t and noise, form x_t with the closed-form forward
    process, and regress the model's output at (x_t, t) on the target. The model trains on its own device.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must both be at least 1.")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    # A short warm-up then cosine decay: a few hundred steps reach a usable model only with a high peak rate.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="training the denoiser", disable=not progress):
        x0 = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, schedule.num_train_timesteps, (batch_size,), generator=generator)
        x0, noise, timesteps = x0.to(device), noise.to(device), timesteps.to(device)
        prediction = model(schedule.add_noise(x0, noise, timesteps), timesteps).sample
        loss = F.mse_loss(prediction, diffusion_target(schedule, x0, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def as_denoise_fn(model: UNet2DModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `denoise(x_t, t)` callable that `schedule.sample_loop` expects, running `model` without gradients."""

    @torch.no_grad()
    def denoise(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return model(sample, timesteps).sample

    return denoise


# --------------------------------------------------------------------------------------------------------------------
# Photos and the VAE


def subject_pixels(folders: Sequence[str | Path], resolution: int) -> torch.Tensor:
    """Every usable image in `folders`, centre-cropped to `resolution`: float32 [N, 3, R, R] in [-1, 1]."""
    paths = []
    for folder in folders:
        report = check_folder(folder, progress=False)
        report.raise_for_problems()
        paths += report.usable
    return torch.stack([image_pixels(path, resolution) for path in paths])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """decode(encode(x)) with the mean of q(z | x): float32 pixels on the CPU, like `pixels`.

    Runs in batches of `batch_size` on the VAE's device and dtype (the full-size VAE at 512 px needs the memory).
    """
    parameter = next(vae.parameters())
    outputs = []
    for batch in pixels.split(batch_size):
        latents = vae.encode(batch.to(parameter.device, parameter.dtype)).latent_dist.mean
        outputs.append(vae.decode(latents).sample.float().cpu())
    return torch.cat(outputs)


def reconstruction_error(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean squared error between `pixels` and their reconstruction, in the [-1, 1] pixel scale."""
    return F.mse_loss(reconstruct(vae, pixels), pixels.float()).item()


def warm_up_vae(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    *,
    steps: int = 200,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `vae` in place to reconstruct `pixels` (and their mirror images); returns the loss per step.

    The VAE loss (Kingma & Welling 2014): reconstruction error of a sample of q(z | x), plus a KL term that keeps q
    near N(0, I). Stable Diffusion's autoencoder weights the KL term very lightly (Rombach et al. 2022, appendix G),
    so the latents stay detailed; `kl_weight` does the same here.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1.")
    parameter = next(vae.parameters())
    batch = torch.cat([pixels, pixels.flip(-1)]).to(parameter.device, parameter.dtype)
    generator = torch.Generator(parameter.device).manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    vae.train()
    losses = []
    for _ in tqdm(range(steps), desc="warming up the VAE", disable=not progress):
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval()
    return losses
