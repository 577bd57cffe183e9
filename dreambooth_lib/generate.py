"""Sampling images from a pipeline with per-image seeds, so results repeat whatever the batch size."""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm


def generate(
    pipeline,
    prompt: str,
    *,
    num_images: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    negative_prompt: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """Generate `num_images` images of `prompt`; image i always uses seed `seed + i`.

    `pipeline_kwargs` go to the pipeline call as they are, e.g. `cross_attention_kwargs={"scale": 0.5}` for a LoRA's
    strength.

    The same seed gives the same image whatever the batch size, up to float rounding (a batched matrix product may
    round a last bit differently, which can move a pixel by one level).

    `resolution` defaults to the pipeline's native size (the UNet's sample size times the VAE's scale factor).
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images ({num_images}) and batch_size ({batch_size}) must be at least 1.")
    resolution = resolution or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    device = pipeline.unet.device
    # A CPU generator per image gives the same noise on every device, so a seed means the same image everywhere.
    pipeline.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    batches = range(0, num_images, batch_size)
    for start in tqdm(batches, desc="generating", disable=not progress or len(batches) == 1):
        count = min(batch_size, num_images - start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
        side = resolution // pipeline.vae_scale_factor
        shape = (pipeline.unet.config.in_channels, side, side)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        latents = latents.to(device=device, dtype=pipeline.unet.dtype)
        output = pipeline(
            prompt=[prompt] * count,
            negative_prompt=[negative_prompt] * count if negative_prompt else None,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            latents=latents,
            **pipeline_kwargs,
        )
        images.extend(output.images)
    return images
