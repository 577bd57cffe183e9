"""The DreamBooth loop as the usual training scripts write it: the yardstick `train_speed.py` measures ours against.

Same components, data, batch, precision, gradient checkpointing, adapters and objective as `dreambooth_lib.train`;
what differs is what the usual scripts do every step and we do not:

- the VAE encodes every batch of images (we encode each image once, before the loop);
- the text encoder(s) embed the prompts every step, also when frozen (we embed frozen prompts once);
- AdamW with PyTorch's default settings and fp32 state (we use the fused/multi-tensor kernels, or 8-bit state when a
  preset asks for it).

The maths it borrows from the library (prompt encoding, adapter set-up) is the maths the scripts do too; borrowing it
keeps the comparison about the loop, not about two implementations of the same formula.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from dreambooth_lib import data, lora
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.models import load_components
from dreambooth_lib.text import encode_tokens, tokenize_prompt


def train_reference(config: TrainConfig, on_step: Callable[[int, float], None]) -> None:
    """Train `config.max_steps` optimiser steps the plain way, calling `on_step(step, loss)` after each one."""
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    components = load_components(config.model, kind=config.kind, vae=config.vae)
    vae, unet = components.vae, components.unet

    # Frozen parts in the compute precision, trained parts in fp32 (the scripts' recipe, and ours).
    vae.requires_grad_(False)
    vae.to(device, torch.float32 if getattr(vae.config, "force_upcast", True) else weight_dtype)
    full_text = config.train_text_encoder and not config.use_lora
    for encoder in components.text_encoders:
        encoder.requires_grad_(full_text)
        encoder.to(device, torch.float32 if full_text else weight_dtype)
    if config.use_lora:
        unet.requires_grad_(False)
        unet.to(device, weight_dtype)
        params = lora.add_lora(
            components, rank=config.lora_rank, alpha=config.lora_alpha, train_text_encoder=config.train_text_encoder
        )
        cast_training_params([unet, *components.text_encoders], dtype=torch.float32)
    else:
        unet.to(device, torch.float32)
        params = list(unet.parameters())
        if full_text:
            params += [p for encoder in components.text_encoders for p in encoder.parameters()]
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if full_text:
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
    trained_text = [e for e in components.text_encoders if any(p.requires_grad for p in e.parameters())]

    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
        eps=config.adam_epsilon,
    )
    dataset = data.DreamBoothDataset(
        config.instance_dir,
        config.instance_prompt,
        resolution=config.resolution,
        class_dir=config.class_dir if config.with_prior_preservation else None,
        class_prompt=config.class_prompt if config.with_prior_preservation else None,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, collate_fn=data.collate_examples
    )
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps
    )
    unet, optimizer, loader, lr_scheduler, *trained_text = accelerator.prepare(
        unet, optimizer, loader, lr_scheduler, *trained_text
    )
    noise_scheduler = components.noise_scheduler
    unet.train()

    step = 0
    while step < config.max_steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                pixels = batch["pixel_values"].to(device, vae.dtype)
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = [ids.to(device) for ids in tokenize_prompt(components, batch["prompts"])]
                with torch.set_grad_enabled(bool(trained_text)):
                    prompt = encode_tokens(components, ids)
                added = None
                if components.kind == "sdxl":
                    side = config.resolution
                    time_ids = torch.tensor([[side, side, 0, 0, side, side]] * len(latents), device=device)
                    added = {"text_embeds": prompt.pooled, "time_ids": time_ids}
                prediction = unet(noisy, timesteps, prompt.embeds, added_cond_kwargs=added).sample
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                if batch["with_prior"]:
                    prediction, prior_prediction = prediction.chunk(2)
                    target, prior_target = target.chunk(2)
                    prior = F.mse_loss(prior_prediction.float(), prior_target.float())
                    loss = F.mse_loss(prediction.float(), target.float()) + config.prior_weight * prior
                else:
                    loss = F.mse_loss(prediction.float(), target.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                on_step(step, loss.item())  # the scripts log the loss every step, which waits for the GPU too
                if step >= config.max_steps:
                    break
    accelerator.end_training()
