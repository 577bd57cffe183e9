"""The model card (README.md) of a training run: what was trained, on what, how, and how to load it.

It is written from the run's TrainConfig only, which holds no credentials, so no token can reach it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from dreambooth_lib.config import TrainConfig

# The settings a reader needs to judge or repeat the run, in this order.
_SHOWN = (
    "model",
    "vae",
    "instance_prompt",
    "class_prompt",
    "with_prior_preservation",
    "prior_weight",
    "num_class_images",
    "resolution",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "optimizer",
    "use_8bit_adam",
    "train_text_encoder",
    "text_encoder_lr",
    "text_encoder_fraction",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "use_dora",
    "mixed_precision",
    "noise_offset",
    "min_snr_gamma",
    "seed",
)


def write_model_card(config: TrainConfig, run_dir: str | Path, kind: str, losses: list[dict]) -> Path:
    """Write `run_dir/README.md` for a finished run whose folder holds samples.png and loss.png."""
    run_dir = Path(run_dir)
    method = "LoRA" if config.use_lora else "full fine-tune"
    pipeline_class = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    values = dataclasses.asdict(config)
    rows = "\n".join(f"| `{name}` | `{values[name]!r}` |" for name in _SHOWN)
    final = losses[-1]["loss"] if losses else math.nan
    if config.use_lora:
        load = (
            f"pipe = {pipeline_class}.from_pretrained({config.model!r})\n"
            f'pipe.load_lora_weights("{run_dir.name}")  # or the kohya file lora_kohya.safetensors in A1111/ComfyUI'
        )
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{run_dir.name}/pipeline")'
    prior = "(no prior preservation)"
    if config.with_prior_preservation:
        prior = f"(class prompt `{config.class_prompt}`, prior-preservation weight {config.prior_weight})"
    text = f"""---
library_name: diffusers
base_model: {config.model}
instance_prompt: {config.instance_prompt}
tags:
- dreambooth
- {"lora" if config.use_lora else "text-to-image"}
- {"stable-diffusion-xl" if kind == "sdxl" else "stable-diffusion"}
---

# DreamBooth ({method}) of `{config.model}`

Trained with `dreambooth_lib` to draw one subject, called by the identifier in **`{config.instance_prompt}`**
{prior}.
{config.max_steps} steps; final loss {final:.4f}.

## Samples

Prompts {", ".join(f"`{prompt}`" for prompt in config.validation_prompts)}, seeds {config.seed} to
{config.seed + config.num_validation_images - 1}, {config.validation_inference_steps} steps, guidance \
{config.guidance_scale}:

![samples](samples.png)

![loss curve](loss.png)

## Use

```python
from diffusers import {pipeline_class}

{load}
image = pipe({config.validation_prompts[0]!r}).images[0]
```

or, for any run folder (also one trained on the tiny model):
`dreambooth_lib.train.load_run_pipeline("{run_dir.name}")`.

## Settings

| setting | value |
| --- | --- |
{rows}

The full configuration is in `config.json`; `python -m dreambooth_lib train --config config.json` repeats the run.
"""
    path = run_dir / "README.md"
    path.write_text(text)
    return path
