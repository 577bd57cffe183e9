"""The model card (README.md) of a training run: what was trained, on what, how, and how to load it.

It is written from the run's TrainConfig only, which holds no credentials, so no token can reach it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from dreambooth_lib.config import KEY_SETTINGS, TrainConfig
from dreambooth_lib.files import write_text_atomically


def write_model_card(config: TrainConfig, run_dir: str | Path, kind: str, losses: list[dict]) -> Path:
    """Write `run_dir/README.md` for a finished run whose folder holds samples.png and loss.png."""
    run_dir = Path(run_dir)
    method = "LoRA" if config.use_lora else "full fine-tune"
    pipeline_class = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    values = dataclasses.asdict(config)
    rows = "\n".join(f"| `{name}` | `{values[name]!r}` |" for name in KEY_SETTINGS)
    final = losses[-1]["loss"] if losses else math.nan
    # Paths as the run was given them (output_dir): they work from the folder the user trained in.
    where = run_dir.as_posix()
    skipped = sum(row.get("skipped", 0) for row in losses)
    # fp16 loss scaling throws away the updates of steps with inf/NaN gradients: say how many steps really trained.
    scaler = f" The fp16 gradient scaler skipped {skipped} of them (inf/NaN gradients)." if skipped else ""
    if config.use_lora:
        load = (
            f"pipe = {pipeline_class}.from_pretrained({config.model!r})\n"
            f'pipe.load_lora_weights("{where}")  # or the kohya file lora_kohya.safetensors in A1111/ComfyUI'
        )
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{where}/pipeline")'
    prior = "(no prior preservation)"
    if config.with_prior_preservation:
        prior = f"(class prompt `{config.class_prompt}`, prior-preservation weight {config.prior_weight})"
    samples = "No validation prompts: no samples were drawn.\n\n"
    if config.validation_prompts:
        samples = (
            f"Prompts {', '.join(f'`{prompt}`' for prompt in config.validation_prompts)}, seeds {config.seed} to "
            f"{config.seed + config.num_validation_images - 1}, {config.validation_inference_steps} steps, guidance "
            f"{config.guidance_scale}:\n\n![samples](samples.png)\n\n"
        )
    example_prompt = (config.validation_prompts or [config.instance_prompt])[0]
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
{config.max_steps} steps; final loss {final:.4f}.{scaler}

## Samples

{samples}![loss curve](loss.png)

## Use

```python
from diffusers import {pipeline_class}

{load}
image = pipe({example_prompt!r}).images[0]
```

or, for any run folder (also one trained on the tiny model):
`dreambooth_lib.models.load_run_pipeline("{where}")`.

## Settings

| setting | value |
| --- | --- |
{rows}

The full configuration is in `config.json`; `python -m dreambooth_lib train --config config.json` repeats the run.
"""
    return write_text_atomically(run_dir / "README.md", text)
