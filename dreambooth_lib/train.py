"""DreamBooth training on `accelerate`: `train(TrainConfig(...))` runs the whole recipe and writes one run folder.

Read `train` top to bottom: `set_up` checks the data, makes the class images, loads and freezes the model (adding LoRA
adapters when asked), caches latents and prompts and lets accelerate wrap what trains; `_loop` trains; `_save` writes
the results. `Accelerator` owns devices, mixed precision, gradient accumulation and checkpoint state; peft owns the
adapters. The pieces live in the modules named after them: `data` (examples), `denoiser` (the model that trains),
`losses` (the objective), `models` (loading).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from dreambooth_lib import data, images, lora, priors, runs
from dreambooth_lib.checkpoints import checkpoint_step, expected_size, resolve_resume, save_checkpoint
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.denoiser import Denoiser, sdxl_time_ids
from dreambooth_lib.files import atomic_output, check_free_space
from dreambooth_lib.generate import generate
from dreambooth_lib.losses import LossParts, diffusion_loss, sample_noise
from dreambooth_lib.losslog import NonFiniteWatch, read_loss_log, write_loss_log
from dreambooth_lib.memory import warn_if_too_big
from dreambooth_lib.modelcard import write_model_card
from dreambooth_lib.models import Components, build_pipeline, load_base, save_components
from dreambooth_lib.plots import image_grid, loss_curve
from dreambooth_lib.schedule import NoiseSchedule
from dreambooth_lib.text import PromptEmbeddings, encode_prompt, tokenize_prompt

__all__ = ["TrainResult", "Training", "set_up", "train"]

LORA_FILE = lora.LORA_WEIGHTS_NAME
KOHYA_FILE = "lora_kohya.safetensors"

Callback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """Where a run wrote its results, its loss log (rows of loss.csv as dicts) and the checkpoint it resumed from."""

    run_dir: Path
    output: Path  # the pipeline folder (full fine-tune) or the LoRA file
    losses: list[dict[str, float]]
    resumed_from: Path | None = None  # the checkpoint folder this run started from; None when it started at step 0

    @property
    def final_loss(self) -> float:
        return self.losses[-1]["loss"]


@dataclass
class Training:
    """Everything `set_up` prepares and the loop uses: the wrapped model, optimiser, data and where the run stands."""

    config: TrainConfig
    accelerator: Accelerator
    components: Components
    denoiser: torch.nn.Module  # the Denoiser, as accelerate wrapped it
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    examples: data.SeededExamples
    loader: torch.utils.data.DataLoader
    schedule: NoiseSchedule
    prompt_cache: dict[str, PromptEmbeddings] | None  # None when the text encoder trains
    weight_dtype: torch.dtype  # of the frozen modules: the mixed-precision dtype, or float32
    run_dir: Path
    start_step: int
    resumed_from: Path | None  # the checkpoint restored, None for a fresh start
    losses: list[dict]  # loss.csv rows up to start_step (main process only)
    record: runs.RunRecord  # the run's id and fingerprint (run.json)
    mirror: Path | None  # the copy's folder (Colab: on Google Drive)
    watch: NonFiniteWatch

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / runs.CHECKPOINTS


def train(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run DreamBooth as `config` says and write the run folder (see the module docstring of `dreambooth_lib.train`).

    Each of `callbacks` is called on the main process after every optimiser step with the step and its loss.csv row
    (e.g. `widgets.LiveLossPlot`).

    Before any work the run folder is locked and checked (`runs.claim`): another run's folder, or a live run in it,
    raises `runs.RunError`. A loss that is NaN or infinite for `max_nonfinite_steps` steps raises
    `losslog.NonFiniteLossError`, with nothing new saved.
    """
    config.validate()
    with runs.claim(config, main=PartialState().is_main_process):
        training = set_up(config)
        _loop(training, callbacks)
        return _save(training)


# --------------------------------------------------------------------------------------------------------------------
# Set-up: steps 1-5, before the first optimiser step.


def set_up(config: TrainConfig) -> Training:
    """Check the data, make the class images, load and freeze, cache, and let accelerate wrap what trains; resume."""
    config.validate()
    accelerator = _new_accelerator(config)
    config.validate(accelerator.device)
    warn_if_too_big(config, accelerator.device)
    main = accelerator.is_main_process
    run_dir = Path(config.output_dir)

    # 1. Check the photos before any model loads (a bad file fails here, naming itself); keep them decoded.
    instance_report = images.check_folder(config.instance_dir, config.resolution, keep_images=True)
    instance_report.raise_for_problems("instance_dir")
    record, mirror, resume = _find_resume(config, accelerator)

    # 2. Prior preservation: class images from the very base model being fine-tuned; existing ones count.
    class_dir = None
    if config.with_prior_preservation:
        class_dir = Path(config.class_dir) if config.class_dir else run_dir / "class_images"
        if main:
            _ensure_class_images(config, class_dir, accelerator.device)
        accelerator.wait_for_everyone()
    dataset = data.DreamBoothDataset(
        instance_report,
        config.instance_prompt,
        resolution=config.resolution,
        class_dir=class_dir,
        class_prompt=config.class_prompt if class_dir else None,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
    )

    # 3. Load; freeze what is not trained, in the low-precision dtype; what is trained stays fp32 (fp16 master weights
    #    cannot be unscaled: "Attempting to unscale FP16 gradients"). Seeded here, after class-image generation (which
    #    may or may not run), so every run trains alike; each process draws different noise.
    set_seed(config.seed, device_specific=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    components = load_base(config, _load_dtypes(config, weight_dtype))
    trainable = _set_up_trainable(components, config, weight_dtype, accelerator.device)
    denoiser = Denoiser(components, config.train_text_encoder)
    _enable_memory_savers(config, components, denoiser)

    # 4. Cache what does not change: VAE latents, and the prompts' embeddings when the text encoder is frozen.
    if config.cache_latents:
        dataset = data.LatentCache.build(dataset, components.vae, device=accelerator.device)
    prompt_cache = None if config.train_text_encoder else _encode_prompts(config, components)
    # What the loop never runs waits in CPU memory (SDXL: 1.7 GiB a T4 needs); sampling brings it back.
    components.park_frozen(vae=config.cache_latents, text_encoders=prompt_cache is not None)

    # 5. Optimiser, schedule, data; then accelerate wraps them, and a resumed run restores them.
    optimizer = _make_optimizer(config, trainable, components)
    examples = data.SeededExamples(dataset, config.seed)
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
    start_step = _resume(accelerator, trainable, resume)
    # The loss history travels in the checkpoint: a torn or lost loss.csv in the run folder does not matter.
    losses = read_loss_log(resume / "loss.csv", up_to=start_step) if main and resume else []
    return Training(
        config, accelerator, components, denoiser, trainable, optimizer, lr_scheduler, examples, loader, schedule,
        prompt_cache, weight_dtype, run_dir, start_step, resume, losses, record, mirror, NonFiniteWatch(config),
    )  # fmt: skip


def _new_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator with this run's precision and accumulation.

    accelerate keeps its state process-wide and refuses a second Accelerator with another mixed precision ("cannot be
    changed, restart your runtime"), yet a notebook may well train twice with different settings. There is no public
    way to start afresh, so the private `AcceleratorState._reset_state` is called;
    `test_train.test_accelerator_takes_each_runs_precision` fails if accelerate changes it.
    """
    AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # The sampler's order depends only on (seed, epoch): a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        # A text encoder that stops training part-way leaves parameters without gradients in the DDP wrapper.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=_text_encoder_stops_early(config))],
    )


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


def _find_resume(config: TrainConfig, accelerator: Accelerator) -> tuple[runs.RunRecord, Path | None, Path | None]:
    """The run's record (written by the main process's `runs.claim`), its mirror folder, and the checkpoint to resume
    from: this run's newest (on local disk or in the mirror) or the one `resume_from` names; None for a fresh start."""
    accelerator.wait_for_everyone()  # the main process has claimed the folder and written run.json
    run_dir = Path(config.output_dir)
    record = runs.RunRecord.read(run_dir)
    mirror = Path(config.mirror_dir) if config.mirror_dir else None
    searched = [run_dir / runs.CHECKPOINTS] + ([mirror / runs.CHECKPOINTS] if mirror else [])
    resume = resolve_resume(config.resume_from, searched, record.run_id, record.digest)
    if resume is not None and checkpoint_step(resume) > config.max_steps:
        raise runs.RunError(
            f"the latest checkpoint of {run_dir} is at step {checkpoint_step(resume)}, beyond "
            f"max_steps={config.max_steps}: set max_steps to {checkpoint_step(resume)} or more to use it."
        )
    return record, mirror, resume


def _ensure_class_images(config: TrainConfig, class_dir: Path, device: torch.device) -> None:
    """Generate the missing class images with a frozen copy of the base model (fp16 on a GPU), then free it.

    Images generated earlier for another prompt, model or resolution are refused (DataError), never reused."""
    provenance = dict(model=config.model, resolution=config.resolution)
    priors.check_class_images(class_dir, prompt=config.class_prompt, **provenance)
    if len(priors.existing_class_images(class_dir)) >= config.num_class_images:
        return  # enough already: do not even load the model
    base = load_base(config, torch.float16 if device.type == "cuda" else None)
    priors.generate_class_images(
        build_pipeline(base).to(device),
        class_dir,
        config.class_prompt,
        config.num_class_images,
        batch_size=config.class_batch_size,
        num_inference_steps=config.class_inference_steps,
        seed=config.seed,
        **provenance,
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


def _enable_memory_savers(config: TrainConfig, components: Components, denoiser: Denoiser) -> None:
    """The attention kernel and gradient checkpointing the settings ask for."""
    if config.attention == "xformers":  # SDPA otherwise: diffusers' default on PyTorch 2
        components.unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for encoder in denoiser.text_encoders:
            encoder.gradient_checkpointing_enable()


def _encode_prompts(config: TrainConfig, components: Components) -> dict[str, PromptEmbeddings]:
    """The embeddings of the instance (and class) prompt, computed once for a frozen text encoder."""
    prompts = [config.instance_prompt] + ([config.class_prompt] if config.with_prior_preservation else [])
    return {prompt: encode_prompt(components, prompt) for prompt in prompts}


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


def _resume(accelerator: Accelerator, trainable: list[torch.nn.Parameter], resume: Path | None) -> int:
    """Restore weights, optimiser, schedule and RNG states from the checkpoint `resume`; its step, or 0."""
    if resume is None:
        return 0
    accelerator.load_state(str(resume), strict=False)
    _check_fp32(trainable)
    accelerator.print(f"resumed from {resume.name} ({resume})")
    return checkpoint_step(resume)


# --------------------------------------------------------------------------------------------------------------------
# Step 6: the loop. One optimiser step = gradient_accumulation_steps batches; steps_per_epoch counts optimiser steps.


def _loop(training: Training, callbacks: Sequence[Callback]) -> None:
    """Train from `start_step` to `max_steps`: per batch noise, loss, backward, and (every accumulation) one optimiser
    step; per optimiser step a loss.csv row, the callbacks, and the checkpoints and validation images due."""
    config, main = training.config, training.accelerator.is_main_process
    progress = tqdm(
        total=config.max_steps, initial=training.start_step, desc="training", disable=not main, dynamic_ncols=True
    )
    try:
        _train_steps(training, callbacks, progress)
    finally:  # also on an error: a bar left open would be redrawn under the error message
        progress.close()


def _train_steps(training: Training, callbacks: Sequence[Callback], progress: tqdm) -> None:
    """The optimiser steps from `start_step` to `max_steps` (see `_loop`)."""
    config, accelerator = training.config, training.accelerator
    steps_per_epoch = math.ceil(len(training.loader) / config.gradient_accumulation_steps)
    text_encoder_steps = round(config.text_encoder_fraction * config.max_steps)
    main = accelerator.is_main_process
    step = training.start_step
    training.denoiser.train()
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        training.loader.set_epoch(epoch)
        training.examples.epoch = epoch
        # Resuming mid-epoch: skip the batches already seen, without loading them.
        batches = accelerator.skip_first_batches(training.loader, done_in_epoch * config.gradient_accumulation_steps)
        parts_sum, micro_batches = None, 0
        for batch in batches:
            with accelerator.accumulate(training.denoiser):
                parts = _batch_loss(training, batch, train_text=step < text_encoder_steps)
                accelerator.backward(parts.total)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(training.trainable, config.max_grad_norm)
                training.optimizer.step()
                training.lr_scheduler.step()
                training.optimizer.zero_grad(set_to_none=True)
            parts_sum = _add_parts(parts_sum, parts)
            micro_batches += 1
            if not accelerator.sync_gradients:
                continue

            step += 1
            row = _loss_row(accelerator, step, parts_sum, micro_batches, training.lr_scheduler.get_last_lr()[0])
            row["skipped"] = int(accelerator.optimizer_step_was_skipped)  # the fp16 scaler found inf/NaN gradients
            parts_sum, micro_batches = None, 0
            training.watch.check(row)  # the same reduced row on every process: all stop together
            if main:
                training.losses.append(row)
                progress.update(1)
                progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                for callback in callbacks:
                    callback(step, row)
            _checkpoint_and_validate(training, step)
            if step >= config.max_steps:
                break


def _batch_loss(training: Training, batch: dict, train_text: bool) -> LossParts:
    """The DreamBooth loss of one batch: its latents (cached or encoded now), fresh noise and timesteps, its prompts."""
    config, components, device = training.config, training.components, training.accelerator.device
    if "latents" in batch:
        latents = batch["latents"].to(device)
    else:
        vae = components.vae
        with torch.no_grad():
            latents = data.encode_latents(vae, batch["pixel_values"].to(vae.device, vae.dtype)).to(device)
    noise = sample_noise(latents, config.noise_offset)
    timesteps = torch.randint(0, training.schedule.num_train_timesteps, (len(latents),), device=latents.device)
    if training.prompt_cache is None:  # token ids: the trained text encoder runs inside the denoiser
        prompt = [ids.to(device) for ids in tokenize_prompt(components, batch["prompts"])]
    else:
        cached = [training.prompt_cache[text] for text in batch["prompts"]]
        prompt = PromptEmbeddings.cat(cached).to(device, training.weight_dtype)
    time_ids = None
    if components.kind == "sdxl":
        time_ids = sdxl_time_ids(config.resolution, device).expand(len(latents), -1)
    return diffusion_loss(
        training.denoiser,
        training.schedule,
        latents,
        prompt,
        noise,
        timesteps,
        with_prior=batch["with_prior"],
        prior_weight=config.prior_weight,
        min_snr_gamma=config.min_snr_gamma,
        time_ids=time_ids,
        train_text=train_text,
    )


def _add_parts(total: torch.Tensor | None, parts: LossParts) -> torch.Tensor:
    """Running sum of (loss, instance loss, prior loss) over the micro-batches of one optimiser step."""
    prior = parts.prior.detach() if parts.prior is not None else torch.tensor(float("nan"), device=parts.total.device)
    values = torch.stack([parts.total.detach(), parts.instance.detach(), prior]).float()
    return values if total is None else total + values


def _loss_row(accelerator: Accelerator, step: int, parts_sum: torch.Tensor, count: int, lr: float) -> dict:
    """One row of loss.csv: the step's losses averaged over micro-batches and processes."""
    loss, instance, prior = (accelerator.reduce(parts_sum / count, reduction="mean")).tolist()
    return {"step": step, "loss": loss, "instance_loss": instance, "prior_loss": prior, "lr": lr}


def _checkpoint_and_validate(training: Training, step: int) -> None:
    """Every `checkpointing_steps` and at the last step: the loss log and a resumable checkpoint (never while the loss
    is not a number: the weights may not be either); every `validation_steps`: a sample grid."""
    config, accelerator = training.config, training.accelerator
    main = accelerator.is_main_process
    cadence = config.checkpointing_steps
    if cadence and (step % cadence == 0 or step == config.max_steps) and not training.watch.failing:
        if main:
            _save_loss_log(training)
        run = {"run_id": training.record.run_id, "digest": training.record.digest}
        size = expected_size(training.trainable, training.optimizer)
        mirror = training.mirror / runs.CHECKPOINTS if training.mirror else None
        keep = config.checkpoints_total_limit
        save_checkpoint(accelerator, training.checkpoint_dir, step, keep, run, size, training.losses, mirror)
    if main and config.validation_steps and step % config.validation_steps == 0:
        _sample_grid(training).save(training.run_dir / f"validation-{step}.png")


def _save_loss_log(training: Training) -> None:
    """loss.csv in the run folder and in the mirror, each replaced whole."""
    for folder in (training.run_dir, training.mirror):
        if folder is not None:
            write_loss_log(folder / "loss.csv", training.losses)


def _sample_grid(training: Training):
    """Images of the validation prompts (seeds seed, seed+1, ...) from the live modules, never casting their weights:
    autocast computes in low precision while the trained fp32 weights stay as they are."""
    config, components = training.config, training.components
    pipeline = build_pipeline(components)
    was_training = components.unet.training
    components.unet.eval()
    images = []
    accelerator = training.accelerator
    with torch.no_grad(), accelerator.autocast(), components.on_device(accelerator.device):
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
    components.unet.train(was_training)
    return image_grid(images, columns=config.num_validation_images)


# --------------------------------------------------------------------------------------------------------------------
# Step 7: save once, from the main process: the weights, the loss log and curve, samples and the model card.


def _save(training: Training) -> TrainResult:
    config, accelerator, components, run_dir = (
        training.config,
        training.accelerator,
        training.components,
        training.run_dir,
    )
    accelerator.wait_for_everyone()
    output = run_dir / ("pipeline" if not config.use_lora else LORA_FILE)
    if accelerator.is_main_process:
        _save_loss_log(training)
        loss_curve(run_dir / "loss.csv", run_dir / "loss.png")
        if config.use_lora:
            lora.save_lora(components, run_dir)
            lora.export_kohya(run_dir / LORA_FILE, run_dir / KOHYA_FILE)
        else:
            _save_pipeline(components, output, accelerator.device)
        if config.validation_prompts:  # none asked for: no samples.png (and the card says so)
            with atomic_output(run_dir / "samples.png") as temporary:
                _sample_grid(training).save(temporary, format="PNG")
        write_model_card(config, run_dir, components.kind, training.losses)
        skipped = sum(row["skipped"] for row in training.losses)
        if skipped:
            print(f"the fp16 gradient scaler skipped {skipped} of {len(training.losses)} steps (inf/NaN gradients)")
        if training.mirror is not None:
            runs.mirror_outputs(run_dir, training.mirror)
    accelerator.end_training()
    return TrainResult(run_dir=run_dir, output=output, losses=training.losses, resumed_from=training.resumed_from)


def _save_pipeline(components: Components, folder: Path, device: torch.device) -> None:
    """Write the diffusers pipeline folder whole or not at all: in fp16 after training on a GPU, where it is sampled in
    fp16 anyway, at half the size (SD 1.5: 2.1 GB instead of 4.3 GB); in fp32 on a CPU, which samples in fp32."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    modules = (components.vae, components.unet, *components.text_encoders)
    size = sum(p.numel() for module in modules for p in module.parameters()) * dtype.itemsize
    check_free_space(folder.parent, size, f"the trained model ({folder.name}/)")
    for module in modules:  # trained modules were fp32, frozen ones were only cast to save memory
        _place(module, device, dtype)
    with atomic_output(folder) as temporary:
        save_components(components, temporary)
