"""The Stable Diffusion families this package trains, named once: their `kind`, default hub ids and native sizes.

A plain-data module (no heavy imports), so settings (`config`), loading (`models`) and the memory estimate (`memory`)
all read the same facts.
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["sd", "sdxl"]  # "sd": SD 1.x/2.x (one text encoder); "sdxl": SDXL (two, and size conditioning)
KINDS: tuple[Kind, ...] = ("sd", "sdxl")

TINY = "tiny"  # the model name of the tiny random components built in code
DEFAULT_MODELS: dict[Kind, str] = {
    # The id older tutorials use, runwayml/stable-diffusion-v1-5, was removed from the hub.
    "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# SDXL's own VAE produces NaNs in fp16; this fine-tune of it does not (same latent space).
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"
# Resolution each family was trained at; tiny components work on 64 px images (8x8 latents).
NATIVE_RESOLUTION: dict[str, int] = {"sd": 512, "sdxl": 1024, TINY: 64}
