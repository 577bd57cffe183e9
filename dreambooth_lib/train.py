"""DreamBooth training on `accelerate`: `train(TrainConfig(...))` runs the whole recipe and writes one run folder.

Read `train` top to bottom; it follows DESIGN.md section 4:
check the data -> make the class images -> load and freeze -> (LoRA) -> cache latents and prompts -> loop -> save.
`Accelerator` owns devices, mixed precision, gradient accumulation and checkpoint state; peft owns the adapters.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from dreambooth_lib import data, lora, priors
from dreambooth_lib.checkpoints import checkpoint_step, resolve_resume, save_checkpoint
from dreambooth_lib.config import PRESETS, ConfigError, TrainConfig
from dreambooth_lib.generate import generate
from dreambooth_lib.losses import LossParts, diffusion_target, dreambooth_loss, min_snr_weights, sample_noise
from dreambooth_lib.modelcard import write_model_card
from dreambooth_lib.models import Components, build_pipeline, load_components, save_components, tiny_components
from dreambooth_lib.plots import image_grid, loss_curve
from dreambooth_lib.schedule import NoiseSchedule
from dreambooth_lib.text import PromptEmbeddings, encode_prompt, encode_tokens, tokenize_prompt

__all__ = ["PRESETS", "ConfigError", "TrainConfig", "TrainResult", "train", "load_run_pipeline", "diffusion_loss"]

LOSS_COLUMNS = ("step", "loss", "instance_loss", "prior_loss", "lr")
LORA_FILE = lora.LORA_WEIGHTS_NAME
KOHYA_FILE = "lora_kohya.safetensors"


@dataclass
class TrainResult:
    """Where a run wrote its results, and its loss log (rows of loss.csv as dicts)."""

    run_dir: Path
    output: Path  # the pipeline folder (full fine-tune) or the LoRA file
    losses: list[dict[str, float]]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]["loss"]


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


class Denoiser(torch.nn.Module):
    """What training updates: the UNet, and the text encoder(s) when they are trained, as one module.

    One module, so that `accelerator.prepare` wraps everything that gets gradients together (one DDP wrapper on
    several processes) and the text encoding runs inside the wrapped forward.
    """

    def __init__(self, components: Components, train_text_encoder: bool):
        super().__init__()
        self.unet = components.unet
        self.text_encoders = torch.nn.ModuleList(components.text_encoders if train_text_encoder else [])
        self.components = components  # a plain attribute: encode_tokens reads tokenizers and encoders from it

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: PromptEmbeddings | list[torch.Tensor],
        time_ids: torch.Tensor | None = None,
        train_text: bool = True,
    ) -> torch.Tensor:
        """The UNet's prediction; `prompt` is cached embeddings, or token ids to encode here (with autograd)."""
        if not isinstance(prompt, PromptEmbeddings):
            with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
                prompt = encode_tokens(self.components, prompt)
        added_conditions = None
        if self.components.kind == "sdxl":
            # SDXL is also conditioned on the pooled text embedding and (original size, crop top-left, target size).
            added_conditions = {"text_embeds": prompt.pooled, "time_ids": time_ids}
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=prompt.embeds, added_cond_kwargs=added_conditions
        ).sample


def diffusion_loss(
    denoiser: torch.nn.Module,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    prompt: PromptEmbeddings | list[torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    with_prior: bool,
    prior_weight: float = 1.0,
    min_snr_gamma: float | None = None,
    time_ids: torch.Tensor | None = None,
    train_text: bool = True,
) -> LossParts:
    """DreamBooth's objective for one batch: || target - model(x_t, t, c) ||^2 on instances + lambda * on class images.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise (DDPM eq. 4); the target is the noise or v.
    """
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    prediction = denoiser(noisy_latents, timesteps, prompt, time_ids, train_text)
    target = diffusion_target(schedule, latents, noise, timesteps)
    weights = min_snr_weights(schedule, timesteps, min_snr_gamma) if min_snr_gamma else None
    return dreambooth_loss(
        prediction.float(), target.float(), with_prior=with_prior, prior_weight=prior_weight, weights=weights
    )


# --------------------------------------------------------------------------------------------------------------------


def train(config: TrainConfig, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> TrainResult:
    """Run DreamBooth as `config` says and write the run folder (see the module docstring of `dreambooth_lib.train`).

    Each of `callbacks` is called on the main process after every optimiser step with the step and its loss.csv row
    (e.g. `widgets.LiveLossPlot`).
    """
    if config.model != "tiny" or torch.cuda.is_available():
        return _train(config, callbacks)
    # Tiny tensors on a CPU: a second thread only adds synchronisation, which costs seconds per step on a busy machine
    # (the demo took 7.5 min with two threads on a loaded 2-core box, 21 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, callbacks)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, callbacks: Sequence[Callable[[int, dict], None]]) -> TrainResult:
    config.validate()
    run_dir = Path(config.output_dir)
    class_dir = Path(config.class_dir) if config.class_dir else run_dir / "class_images"
    # accelerate keeps its settings process-wide; a notebook may train again with another precision.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # The sampler's order depends only on (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        # A text encoder that stops training part-way leaves parameters without gradients in the DDP wrapper.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_text_encoder_stops_early(config))],
    )
    config.validate(accelerator.device)
    main = accelerator.is_main_process

    # 1. Check the photos before any model loads (a bad file fails here, naming itself).
    data.check_folder(config.instance_dir, config.resolution).raise_for_problems()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")

    # 2. Prior preservation: class images from the very base model being fine-tuned; existing ones count.
    if config.with_prior_preservation:
        if main:
            _ensure_class_images(config, class_dir, accelerator.device)
        accelerator.wait_for_everyone()
    dataset = data.DreamBoothDataset(
        config.instance_dir,
        config.instance_prompt,
        resolution=config.resolution,
        class_dir=class_dir if config.with_prior_preservation else None,
        class_prompt=config.class_prompt if config.with_prior_preservation else None,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
    )

    # 3. Load; freeze what is not trained, in the low-precision dtype; what is trained stays fp32 (fp16 master weights
    #    cannot be unscaled: "Attempting to unscale FP16 gradients").
    # Seeded here, after class-image generation (which may or may not run), so every run trains alike; each process
    # draws different noise.
    set_seed(config.seed, device_specific=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    components = _load_base(config, _load_dtypes(config, weight_dtype))
    trainable = _set_up_trainable(components, config, weight_dtype, accelerator.device)
    denoiser = Denoiser(components, config.train_text_encoder)
    if config.attention == "xformers":  # SDPA otherwise: diffusers' default on PyTorch 2
        components.unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for encoder in denoiser.text_encoders:
            encoder.gradient_checkpointing_enable()

    # 4. Cache what does not change: VAE latents, and the prompts' embeddings when the text encoder is frozen.
    if config.cache_latents:
        dataset = data.LatentCache.build(dataset, components.vae, device=accelerator.device)
    prompts = [config.instance_prompt] + ([config.class_prompt] if config.with_prior_preservation else [])
    prompt_cache = (
        None if config.train_text_encoder else {prompt: encode_prompt(components, prompt) for prompt in prompts}
    )

    # 5. Optimiser, schedule, data; then accelerate wraps them.
    optimizer = _make_optimizer(config, trainable, components)
    examples = SeededExamples(dataset, config.seed)
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=config.train_batch_size,
        shuffle=True,
        collate_fn=data.collate_examples,
        # Its own generator: starting an epoch's iterator then draws nothing from the global RNG (the noise's).
        generator=torch.Generator().manual_seed(config.seed),
    )
    # The prepared scheduler steps once per process per optimiser step, hence the factor (accelerate's design).
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    _save_only_trainable_weights(accelerator)
    schedule = NoiseSchedule.from_config(components.noise_scheduler.config)

    checkpoint_dir = run_dir / "checkpoints"
    start_step = 0
    resume = resolve_resume(config.resume_from, checkpoint_dir)
    if resume is not None:
        accelerator.load_state(str(resume), strict=False)  # restores weights, optimiser, schedule and RNG states
        start_step = checkpoint_step(resume)
        _check_fp32(trainable)
        accelerator.print(f"resumed from {resume} at step {start_step}")
    losses = _read_loss_log(run_dir / "loss.csv", up_to=start_step) if main else []

    # 6. The loop. One optimiser step = gradient_accumulation_steps batches; steps_per_epoch counts optimiser steps.
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    time_ids = _sdxl_time_ids(config.resolution, accelerator.device) if components.kind == "sdxl" else None
    text_encoder_steps = round(config.text_encoder_fraction * config.max_steps)
    progress = tqdm(total=config.max_steps, initial=start_step, desc="training", disable=not main, dynamic_ncols=True)
    step = start_step
    denoiser.train()
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        examples.epoch = epoch
        # Resuming mid-epoch: skip the batches already seen, without loading them.
        batches = accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps)
        parts_sum, micro_batches = None, 0
        for batch in batches:
            with accelerator.accumulate(denoiser):
                latents = batch["latents"] if "latents" in batch else _encode(components, batch["pixel_values"])
                latents = latents.to(accelerator.device)
                noise = sample_noise(latents, config.noise_offset)
                timesteps = torch.randint(0, schedule.num_train_timesteps, (len(latents),), device=latents.device)
                if prompt_cache is None:
                    prompt = [ids.to(accelerator.device) for ids in tokenize_prompt(components, batch["prompts"])]
                else:
                    prompt = _stack_prompts(prompt_cache, batch["prompts"], accelerator.device, weight_dtype)
                parts = diffusion_loss(
                    denoiser,
                    schedule,
                    latents,
                    prompt,
                    noise,
                    timesteps,
                    with_prior=batch["with_prior"],
                    prior_weight=config.prior_weight,
                    min_snr_gamma=config.min_snr_gamma,
                    time_ids=None if time_ids is None else time_ids.expand(len(latents), -1),
                    train_text=step < text_encoder_steps,
                )
                accelerator.backward(parts.total)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            parts_sum = _add_parts(parts_sum, parts)
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            row = _loss_row(accelerator, step, parts_sum, micro_batches, lr_scheduler.get_last_lr()[0])
            parts_sum, micro_batches = None, 0
            if main:
                losses.append(row)
                progress.update(1)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                for callback in callbacks:
                    callback(step, row)
            if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                if main:
                    _write_loss_log(run_dir / "loss.csv", losses)
                save_checkpoint(accelerator, checkpoint_dir, step, config.checkpoints_total_limit)
            if main and config.validation_steps and step % config.validation_steps == 0:
                _sample_grid(components, config, accelerator, weight_dtype).save(run_dir / f"validation-{step}.png")
            if step >= config.max_steps:
                break
    progress.close()

    # 7. Save once, from the main process: the weights, the loss log and curve, samples and the model card.
    accelerator.wait_for_everyone()
    output = run_dir / ("pipeline" if not config.use_lora else LORA_FILE)
    if main:
        _write_loss_log(run_dir / "loss.csv", losses)
        loss_curve(run_dir / "loss.csv", run_dir / "loss.png")
        if config.use_lora:
            lora.save_lora(components, run_dir)
            lora.export_kohya(run_dir / LORA_FILE, run_dir / KOHYA_FILE)
        else:
            # The trained modules leave in fp32 (full precision); frozen ones were only cast to save memory.
            for module in (components.vae, components.unet, *components.text_encoders):
                _place(module, accelerator.device, torch.float32)
            save_components(components, output)
        _sample_grid(components, config, accelerator, weight_dtype).save(run_dir / "samples.png")
        write_model_card(config, run_dir, components.kind, losses)
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, output=output, losses=losses)


# --------------------------------------------------------------------------------------------------------------------
# Set-up helpers, in the order train() uses them.


def _text_encoder_stops_early(config: TrainConfig) -> bool:
    return config.train_text_encoder and config.text_encoder_fraction < 1.0


def _load_dtypes(config: TrainConfig, weight_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Frozen parts load straight in the compute precision (from fp16 files where the model has them: SDXL in fp32
    would not fit a Colab runtime's 12.7 GB of RAM). Trained parts load in fp32, and so does the small VAE, which is
    cast down later only if its config allows half precision."""
    trained = {"vae"} if config.use_lora else {"vae", "unet"}
    if config.train_text_encoder and not config.use_lora:
        trained |= {"text_encoder", "text_encoder_2"}
    return {"default": weight_dtype, **dict.fromkeys(trained, torch.float32)}


def _load_base(config: TrainConfig, torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None) -> Components:
    if config.model == "tiny":
        components = tiny_components(config.kind)  # type: ignore[arg-type]
        # Tiny parts are built in fp32; per-part precisions are set later, when the parts are placed for training.
        return components.to("cpu", torch_dtype) if isinstance(torch_dtype, torch.dtype) else components
    kind = None if config.kind == "sd" else config.kind  # 'sd' is the default: read the family from the model
    return load_components(config.model, kind=kind, vae=config.vae, torch_dtype=torch_dtype)  # type: ignore[arg-type]


def _ensure_class_images(config: TrainConfig, class_dir: Path, device: torch.device) -> None:
    """Generate the missing class images with a frozen copy of the base model (fp16 on a GPU), then free it."""
    if len(priors.existing_class_images(class_dir)) >= config.num_class_images:
        return  # enough already: do not even load the model
    base = _load_base(config, torch.float16 if device.type == "cuda" else None)
    priors.generate_class_images(
        build_pipeline(base).to(device),
        class_dir,
        config.class_prompt,
        config.num_class_images,
        batch_size=config.class_batch_size,
        num_inference_steps=config.class_inference_steps,
        seed=config.seed,
    )
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _set_up_trainable(
    components: Components, config: TrainConfig, weight_dtype: torch.dtype, device: torch.device
) -> list[torch.nn.Parameter]:
    """Freeze, cast and (for LoRA) add adapters; return the parameters the optimiser updates, all fp32."""
    components.vae.requires_grad_(False)
    # SDXL's stock VAE overflows in fp16; VAEs whose config says so (the fp16-fix VAE) may run in low precision.
    vae_dtype = torch.float32 if getattr(components.vae.config, "force_upcast", True) else weight_dtype
    _place(components.vae, device, vae_dtype)
    full_text_encoder = config.train_text_encoder and not config.use_lora
    for encoder in components.text_encoders:
        encoder.requires_grad_(full_text_encoder)
        _place(encoder, device, torch.float32 if full_text_encoder else weight_dtype)
    if config.use_lora:
        components.unet.requires_grad_(False)
        _place(components.unet, device, weight_dtype)
        trainable = lora.add_lora(
            components,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            train_text_encoder=config.train_text_encoder,
            use_dora=config.use_dora,
        )
        # Adapters on fp16 layers: peft may create them in fp16; their master copy must be fp32.
        cast_training_params([components.unet, *components.text_encoders], dtype=torch.float32)
        _check_fp32(trainable)
        return trainable
    components.unet.requires_grad_(True)
    _place(components.unet, device, torch.float32)
    trainable = list(components.unet.parameters())
    if full_text_encoder:
        trainable += [p for encoder in components.text_encoders for p in encoder.parameters()]
    return trainable


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a module, casting only when its dtype differs (diffusers warns on every cast)."""
    if module.dtype == dtype:
        module.to(device)
    else:
        module.to(device, dtype)


def _check_fp32(parameters: list[torch.nn.Parameter]) -> None:
    wrong = {p.dtype for p in parameters if p.dtype != torch.float32}
    if wrong:
        raise RuntimeError(f"trainable parameters must be float32 for mixed precision, found {sorted(map(str, wrong))}")


def _make_optimizer(
    config: TrainConfig, trainable: list[torch.nn.Parameter], components: Components
) -> torch.optim.Optimizer:
    """AdamW (fused), 8-bit AdamW (bitsandbytes) or Prodigy; the text encoder gets its own learning rate."""
    in_text_encoder = {id(p) for encoder in components.text_encoders for p in encoder.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in in_text_encoder], "lr": config.learning_rate}]
    text_params = [p for p in trainable if id(p) in in_text_encoder]
    if text_params:
        groups.append({"params": text_params, "lr": config.text_encoder_lr or config.learning_rate})
    common = dict(
        betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay, eps=config.adam_epsilon
    )
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=config.learning_rate, **common)
    if config.use_8bit_adam:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate, **common)
    # One fused kernel where PyTorch has it (CUDA, and CPUs since 2.4: 4x faster than the multi-tensor path on the
    # tiny model, 5x faster than the per-tensor loop; benchmarks/train_speed.py); the multi-tensor path elsewhere.
    fused = all(p.device.type in ("cuda", "cpu") for p in trainable)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused or None, foreach=not fused or None, **common)


def _save_only_trainable_weights(accelerator: Accelerator) -> None:
    """Checkpoints hold the trained weights only (LoRA: a few MB instead of the whole UNet); resume loads them with
    strict=False over the same base."""

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights, strict=True):
            names = {name for name, p in model.named_parameters() if p.requires_grad}
            for key in [key for key in state if key not in names]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)


# --------------------------------------------------------------------------------------------------------------------
# Loop helpers.


def _encode(components: Components, pixel_values: torch.Tensor) -> torch.Tensor:
    """Latents of a batch of images, when they were not cached up front."""
    vae = components.vae
    with torch.no_grad():
        return data.encode_latents(vae, pixel_values.to(vae.device, vae.dtype))


def _sdxl_time_ids(resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for one image: original size, crop top-left (0, 0), target size (SDXL paper 2.2)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32, device=device)


def _stack_prompts(
    cache: dict[str, PromptEmbeddings], prompts: list[str], device: torch.device, dtype: torch.dtype
) -> PromptEmbeddings:
    """The batch's prompt embeddings, assembled from the cache in the batch's order."""
    return PromptEmbeddings.cat([cache[prompt] for prompt in prompts]).to(device, dtype)


def _add_parts(total: torch.Tensor | None, parts: LossParts) -> torch.Tensor:
    """Running sum of (loss, instance loss, prior loss) over the micro-batches of one optimiser step."""
    prior = parts.prior.detach() if parts.prior is not None else torch.tensor(float("nan"), device=parts.total.device)
    values = torch.stack([parts.total.detach(), parts.instance.detach(), prior]).float()
    return values if total is None else total + values


def _loss_row(accelerator: Accelerator, step: int, parts_sum: torch.Tensor, count: int, lr: float) -> dict:
    """One row of loss.csv: the step's losses averaged over micro-batches and processes."""
    loss, instance, prior = (accelerator.reduce(parts_sum / count, reduction="mean")).tolist()
    return {"step": step, "loss": loss, "instance_loss": instance, "prior_loss": prior, "lr": lr}


def _write_loss_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _read_loss_log(path: Path, up_to: int) -> list[dict]:
    """The rows of an earlier run's loss.csv up to the resumed step (later rows were lost with the crash)."""
    if not path.is_file() or up_to == 0:
        return []
    with path.open(newline="") as file:
        rows = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]
    for row in rows:
        row["step"] = int(row["step"])
    return [row for row in rows if row["step"] <= up_to]


def _sample_grid(components: Components, config: TrainConfig, accelerator: Accelerator, weight_dtype: torch.dtype):
    """Images of the validation prompts (seeds seed, seed+1, ...) from the live modules, never casting their weights:
    autocast computes in low precision while the trained fp32 weights stay as they are."""
    pipeline = build_pipeline(components)
    training = components.unet.training
    components.unet.eval()
    images = []
    with torch.no_grad(), accelerator.autocast():
        for prompt in config.validation_prompts:
            images += generate(
                pipeline,
                prompt,
                num_images=config.num_validation_images,
                seed=config.seed,
                num_inference_steps=config.validation_inference_steps,
                guidance_scale=config.guidance_scale,
                resolution=config.resolution,
                progress=False,
            )
    components.unet.train(training)
    return image_grid(images, columns=config.num_validation_images)


# --------------------------------------------------------------------------------------------------------------------


def load_run_pipeline(run_dir: str | os.PathLike, device: torch.device | str | None = None, dtype=None):
    """The stock diffusers pipeline of a finished run: its `pipeline/` folder, or the base model with its LoRA."""
    run_dir = Path(run_dir)
    config = TrainConfig.from_file(run_dir / "config.json")
    if (run_dir / "pipeline").is_dir():
        components = load_components(str(run_dir / "pipeline"))
        pipeline = build_pipeline(components)
    elif (run_dir / LORA_FILE).is_file():
        pipeline = build_pipeline(_load_base(config))
        pipeline.load_lora_weights(run_dir)
    else:
        raise FileNotFoundError(f"{run_dir} holds neither pipeline/ nor {LORA_FILE}: did its training finish?")
    return pipeline.to(device or "cpu", dtype)
