"""How much GPU memory a DreamBooth run needs: an analytic estimate from the settings, before anything loads.

Peak memory = weights + gradients + optimiser state + autocast's weight copies + activations, each counted from the
model family's parameter counts and the settings of a `TrainConfig`. The assumptions, in one place:

- **Weights.** Trained weights are kept in fp32 (master weights; fp16 trainable weights break the gradient scaler),
  the frozen UNet and text encoders in the compute precision (2 bytes under fp16/bf16 mixed precision, 4 bytes
  without). The VAE stays in fp32 unless its config allows 16 bits, as only SDXL's fp16-fix VAE's does (train.py's
  rule: `force_upcast`).
- **Gradients.** One fp32 gradient per trained parameter.
- **Optimiser state.** AdamW keeps two fp32 moments (8 bytes per trained parameter), 8-bit AdamW two 8-bit moments
  (2 bytes, Dettmers et al. 2022), Prodigy four fp32 tensors (moments, its `s` and the initial weights: 16 bytes).
- **LoRA.** Only the adapters train: rank x (inputs + outputs) parameters per adapted layer (Hu et al. 2021), on the
  UNet's attention projections (to_q, to_k, to_v, to_out) and, with the text encoder, its q/k/v/out projections. The
  base weights count as frozen.
- **Weight copies.** Under mixed precision autocast casts each fp32 trained weight to 16 bits and keeps the copy until
  the forward ends (backward keeps the ones it needs until it has used them): 2 bytes per trained parameter (measured:
  1.60 GiB for the SD 1.5 UNet's 860 M parameters, 4.78 GiB for SDXL's 2.6 B).
- **Activations.** What the forward keeps for backward, per image at the family's native resolution, measured by
  `benchmarks/activation_memory.py` on 2026-11-29 (see `ActivationSizes`): 16-bit autocast with CUDA's fp32
  normalisation layers, PyTorch's fused attention, a margin for backward's own transient tensors and, with gradient
  checkpointing, the block being recomputed. Times the images per micro-batch (`train_batch_size`, doubled by prior
  preservation) and (resolution / native)^2: the measured figures are linear in both to within 3% (SD 1.5 at 256-768
  px, SDXL at 512-1024 px). Without mixed precision, `FP32_ACTIVATION_FACTOR` times as much. Trained text encoders
  add their own activations per prompt.
- **Three moments, the largest is the peak.** (1) *Caching latents*, before the optimiser exists: every module's
  weights plus the VAE encoder's transient tensors for one batch (`data.ENCODE_PIXELS` per call). (2) *The loop*: the
  weights still on the card (train.py parks a frozen VAE and frozen text encoders in CPU memory once latents and
  prompts are cached), the optimiser state, and the larger of (weight copies + activations), alive during the
  forward, and the gradients, which backward creates as it frees the activations (with gradient accumulation the
  earlier micro-batches' gradients live through the next forward: then all three add up). (3) *Sampling* the
  validation images: every weight back on the card, the optimiser state, and the VAE decoder's transient tensors
  for `num_validation_images` images. The VAE's transients are counted per pixel and per byte of its dtype with fake
  tensors by `benchmarks/vae_memory.py` (encoder 643 bytes, decoder 768: 1.26 / 1.50 GiB per 1024 px image in
  fp16).
- Checked against whole-process peaks measured on an H200 (2026-11-29, random weights; the table and its where and
  when are in tests/test_memory.py): within 11% on every preset.
- Not counted: the CUDA context (about 0.3-0.5 GiB outside PyTorch's allocator), kernel workspaces and allocator
  fragmentation (`MemoryEstimate.fits` keeps 1 GiB free for these), the UNet's no-grad activations while sampling,
  and the fp32 cast of frozen modules before a full fine-tune is saved.

Parameter counts are those of SD 1.5 and SDXL base 1.0 (SD 2.x is within a few percent of SD 1.5 in UNet size, its
text encoder is larger), checked against `models.full_size_components`; the tiny components are counted from the real
tiny modules.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.data import ENCODE_PIXELS
from dreambooth_lib.families import DEFAULT_MODELS, SDXL_FP16_VAE, TINY

GIB = 2**30
# The VAE's transient tensors without gradients, in bytes per pixel per byte of the VAE's dtype (the same for the
# SD 1.5 and SDXL VAEs, one architecture with 128 channels at full resolution; tiny VAEs are scaled by their
# channels): `python benchmarks/vae_memory.py`, 2026-11-29.
VAE_ENCODE_BYTES = 644
VAE_DECODE_BYTES = 769
# Photos a DreamBooth subject folder holds (the paper's 3-5): with the class images, what the first VAE batch can hold.
SUBJECT_PHOTOS = 5


@dataclass(frozen=True)
class ActivationSizes:
    """GiB the forward keeps for backward per image, at the family's native resolution under 16-bit autocast.

    Full fine-tuning saves the inputs of every trained layer; LoRA saves less where the frozen base needs no input
    kept. With gradient checkpointing, the blocks' inputs, the layers between blocks and the one block recomputed.
    """

    full: float
    full_checkpointed: float
    lora: float
    lora_checkpointed: float
    text_encoders: float  # per prompt, when the text encoder(s) are trained

    def per_image(self, config: TrainConfig) -> float:
        """The UNet's figure for the config's training mode and checkpointing, plus trained text encoders'."""
        if config.use_lora:
            unet = self.lora_checkpointed if config.gradient_checkpointing else self.lora
        else:
            unet = self.full_checkpointed if config.gradient_checkpointing else self.full
        return unet + (self.text_encoders if config.train_text_encoder else 0.0)


@dataclass(frozen=True)
class FamilySize:
    """Parameter counts of one model family, and the activation figures the estimate scales from."""

    unet: int
    text_encoders: tuple[int, ...]
    vae: int
    unet_lora_per_rank: int  # sum of (inputs + outputs) over the UNet's attention projections
    text_lora_per_rank: tuple[int, ...]  # the same over each text encoder's q/k/v/out projections
    native_resolution: int
    activations: ActivationSizes
    vae_channels: int = 128  # the VAE's full-resolution channels: its transient tensors scale with them


# UNet and VAE counts: the diffusers models built from the published configs; text encoders: CLIP ViT-L/14 (SD 1.5,
# SDXL's first) and OpenCLIP ViT-bigG/14 with projection (SDXL's second). LoRA sums: 12 layers x 4 projections x
# (768 + 768) for ViT-L, 32 x 4 x (1280 + 1280) for bigG. Activations: `python benchmarks/activation_memory.py`,
# 2026-11-29, every figure at its own native resolution (512 px SD 1.5, 1024 px SDXL), nothing extrapolated; results in
# benchmarks/results/activation_memory.json.
FAMILIES: dict[str, FamilySize] = {
    "sd": FamilySize(
        unet=859_520_964,
        text_encoders=(123_060_480,),
        vae=83_653_863,
        unet_lora_per_rank=199_296,
        text_lora_per_rank=(73_728,),
        native_resolution=512,
        activations=ActivationSizes(
            full=1.22, full_checkpointed=0.32, lora=1.12, lora_checkpointed=0.30, text_encoders=0.04
        ),
    ),
    "sdxl": FamilySize(
        unet=2_567_463_684,
        text_encoders=(123_060_480, 694_659_840),
        vae=83_653_863,
        unet_lora_per_rank=1_451_520,
        text_lora_per_rank=(73_728, 327_680),
        native_resolution=1024,
        activations=ActivationSizes(
            full=8.23, full_checkpointed=1.02, lora=7.34, lora_checkpointed=0.92, text_encoders=0.20
        ),
    ),
}
# The tiny UNets at 64 px, from the same script's real-tensor cross-check (the larger of tiny SD and tiny SDXL).
TINY_ACTIVATIONS = ActivationSizes(
    full=0.0012, full_checkpointed=0.00031, lora=0.0012, lora_checkpointed=0.0003, text_encoders=0.0
)
# fp32 activations over 16-bit ones: 1.43-1.75x measured across families, modes and checkpointing (the largest here).
# Not 2x: CUDA autocast already keeps normalisation layers, and the tensors they save, in fp32.
FP32_ACTIVATION_FACTOR = 1.75

OPTIMIZER_BYTES = {"adamw": 8, "adamw-8bit": 2, "prodigy": 16}
# Cards people train DreamBooth on, by the memory they offer (GiB).
REFERENCE_GPUS: dict[str, float] = {"T4": 15.0, "A100 40 GB": 40.0}
# What `fits` leaves free: the CUDA context, kernel workspaces, allocator fragmentation.
RESERVE_GIB = 1.0


class MemoryWarning(UserWarning):
    """The estimated peak memory of a run exceeds the GPU's.

    A UserWarning, not a ResourceWarning: Python hides ResourceWarnings by default, and this one is meant to be seen.
    """


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of a training run, in GiB, by what holds it and when (see the module docstring)."""

    weights: float  # every module's weights, as set up for training
    gradients: float
    optimizer_states: float
    activations: float
    weight_copies: float = 0.0  # autocast's 16-bit copies of the trained weights
    parked: float = 0.0  # frozen weights train.py moves to CPU memory for the loop
    accumulating: bool = False  # gradient accumulation: gradients live through the next forward
    encoding: float = 0.0  # the VAE encoder's transient tensors while latents are cached (one batch)
    decoding: float = 0.0  # the VAE decoder's transient tensors while validation images are sampled

    @property
    def static(self) -> float:
        """What lives across steps in the loop: the weights on the card, gradients and optimiser state."""
        return self.weights - self.parked + self.gradients + self.optimizer_states

    @property
    def loop(self) -> float:
        """The training loop's peak: the forward's copies and activations, or the gradients backward makes."""
        forward = self.weight_copies + self.activations
        held = self.weights - self.parked + self.optimizer_states
        return held + (forward + self.gradients if self.accumulating else max(forward, self.gradients))

    @property
    def caching(self) -> float:
        """Caching latents: all the weights and one batch through the VAE encoder (no optimiser yet)."""
        return self.weights + self.encoding

    @property
    def sampling(self) -> float:
        """Sampling validation images: all the weights back, the optimiser state, the VAE decoder's batch."""
        return self.weights + self.optimizer_states + self.decoding

    @property
    def total(self) -> float:
        return max(self.loop, self.caching, self.sampling)

    @property
    def when(self) -> str:
        """The moment of the peak: "the training loop", "caching latents" or "sampling images"."""
        moments = {"the training loop": self.loop, "caching latents": self.caching, "sampling images": self.sampling}
        return max(moments, key=moments.__getitem__)

    def fits(self, device_gib: float) -> bool:
        """Whether the estimate leaves `RESERVE_GIB` of the card free for the CUDA context and fragmentation."""
        return self.total <= device_gib - RESERVE_GIB

    def __str__(self) -> str:
        # Tiny runs need megabytes: show MiB so their figures are not all 0.0.
        scale, unit = (1, "GiB") if self.total >= 1 else (1024, "MiB")
        parts = {"weights": self.weights - self.parked, "gradients": self.gradients}
        parts["optimiser"] = self.optimizer_states
        if self.weight_copies:  # only under mixed precision
            parts["16-bit weight copies"] = self.weight_copies
        parts["activations"] = self.activations
        detail = ", ".join(f"{name} {value * scale:.1f}" for name, value in parts.items())
        return f"~{self.total * scale:.1f} {unit} peak (estimate, while {self.when}); in the loop: {detail}"


@cache
def _tiny_family(kind: str) -> FamilySize:
    """Count the tiny components' parameters (and their LoRA sizes) from the modules themselves."""
    from dreambooth_lib.models import tiny_components

    components = tiny_components(kind)

    def lora_sum(module: torch.nn.Module, names: tuple[str, ...]) -> int:
        return sum(
            layer.in_features + layer.out_features
            for name, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear) and name.endswith(names)
        )

    def count(module: torch.nn.Module) -> int:
        return sum(parameter.numel() for parameter in module.parameters())

    return FamilySize(
        unet=count(components.unet),
        text_encoders=tuple(count(encoder) for encoder in components.text_encoders),
        vae=count(components.vae),
        unet_lora_per_rank=lora_sum(components.unet, ("to_q", "to_k", "to_v", "to_out.0")),
        text_lora_per_rank=tuple(
            lora_sum(encoder, ("q_proj", "k_proj", "v_proj", "out_proj")) for encoder in components.text_encoders
        ),
        native_resolution=64,
        activations=TINY_ACTIVATIONS,
        vae_channels=components.vae.config.block_out_channels[0],
    )


def family_size(config: TrainConfig) -> FamilySize:
    """The parameter counts for the config's model: the tiny modules, or the full family, whose kind is decided as the
    loader decides it (`models.resolve_kind`: `config.kind`, else read from the model)."""
    from dreambooth_lib.models import resolve_kind

    kind = resolve_kind(config.model, config.kind)  # type: ignore[arg-type]
    return _tiny_family(kind) if config.model == TINY else FAMILIES[kind]


def _vae_bytes(config: TrainConfig, compute_bytes: int) -> int:
    """Bytes per VAE parameter: 16-bit only for the fp16-fix VAE, named in the settings or loaded with the default
    SDXL model (a local folder holding it counts as fp32: an over-estimate of 0.16 GiB)."""
    fp16_fix = config.vae == SDXL_FP16_VAE or (config.vae is None and config.model == DEFAULT_MODELS["sdxl"])
    return compute_bytes if fp16_fix else 4


def trained_parameters(config: TrainConfig) -> int:
    """How many parameters the optimiser updates: the UNet (and text encoders), or their LoRA adapters."""
    size = family_size(config)
    if config.use_lora:
        per_rank = size.unet_lora_per_rank + (sum(size.text_lora_per_rank) if config.train_text_encoder else 0)
        return config.lora_rank * per_rank
    return size.unet + (sum(size.text_encoders) if config.train_text_encoder else 0)


def estimate_memory_gib(config: TrainConfig) -> MemoryEstimate:
    """Estimate the peak GPU memory of training with `config` (see the module docstring for the assumptions)."""
    size = family_size(config)
    mixed = config.mixed_precision != "no"
    compute_bytes = 2 if mixed else 4
    trained = trained_parameters(config)
    # LoRA freezes the whole base; full fine-tuning freezes the text encoders unless it trains them.
    frozen_text = 0 if config.train_text_encoder and not config.use_lora else sum(size.text_encoders)
    frozen = frozen_text + (size.unet if config.use_lora else 0)
    frozen_bytes = compute_bytes * frozen + _vae_bytes(config, compute_bytes) * size.vae
    optimizer = "adamw-8bit" if config.use_8bit_adam else config.optimizer

    images = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    pixels = config.resolution**2
    activations = size.activations.per_image(config) * images * pixels / size.native_resolution**2
    if not mixed:
        activations *= FP32_ACTIVATION_FACTOR
    vae_bytes = _vae_bytes(config, compute_bytes)
    # train.py parks what the loop never runs: the VAE once latents are cached, frozen text encoders once prompts are.
    parked = (vae_bytes * size.vae if config.cache_latents else 0) + (
        0 if config.train_text_encoder else compute_bytes * sum(size.text_encoders)
    )
    cached_images = SUBJECT_PHOTOS + (config.num_class_images if config.with_prior_preservation else 0)
    encode_batch = min(max(1, ENCODE_PIXELS // pixels), cached_images)
    per_pixel = vae_bytes * pixels * size.vae_channels / 128 / GIB
    return MemoryEstimate(
        weights=(4 * trained + frozen_bytes) / GIB,
        gradients=4 * trained / GIB,
        optimizer_states=OPTIMIZER_BYTES[optimizer] * trained / GIB,
        activations=activations,
        weight_copies=(2 * trained if mixed else 0) / GIB,
        parked=parked / GIB,
        accumulating=config.gradient_accumulation_steps > 1,
        encoding=VAE_ENCODE_BYTES * per_pixel * encode_batch if config.cache_latents else 0.0,
        decoding=VAE_DECODE_BYTES * per_pixel * config.num_validation_images,
    )


def _savers(config: TrainConfig) -> dict[str, TrainConfig]:
    """Settings that lower the estimate and are not on yet, each as the changed config (named as the user sets it)."""
    options: dict[str, TrainConfig] = {}
    if config.mixed_precision == "no":
        options["mixed_precision='fp16'"] = config.replace(mixed_precision="fp16")
    if not config.gradient_checkpointing:
        options["gradient_checkpointing=True"] = config.replace(gradient_checkpointing=True)
    if config.optimizer == "adamw" and not config.use_8bit_adam:
        options["use_8bit_adam=True"] = config.replace(use_8bit_adam=True)
    if not config.use_lora:
        options["use_lora=True"] = config.replace(use_lora=True)
    if config.train_batch_size > 1:
        steps = config.train_batch_size * config.gradient_accumulation_steps
        name = f"train_batch_size=1 with gradient_accumulation_steps={steps}"  # the same images per optimiser step
        options[name] = config.replace(train_batch_size=1, gradient_accumulation_steps=steps)
    smaller = config.resolution * 3 // 4 // 64 * 64  # a quarter smaller, rounded down to a multiple of 64 px
    if smaller >= 256:
        options[f"resolution={smaller}"] = config.replace(resolution=smaller)
    return options


def fit_warning(config: TrainConfig, device_gib: float) -> str | None:
    """A message when the estimated peak does not fit a card of `device_gib` GiB, naming what would bring it down;
    None when it fits."""
    estimate = estimate_memory_gib(config)
    if estimate.fits(device_gib):
        return None
    savings = {name: estimate.total - estimate_memory_gib(changed).total for name, changed in _savers(config).items()}
    helpful = [f"{name} (-{saved:.1f} GiB)" for name, saved in savings.items() if saved >= 0.05]
    advice = f" Settings that lower it: {'; '.join(helpful)}." if helpful else ""
    return (
        f"This run may not fit the GPU ({device_gib:.1f} GiB, of which ~{RESERVE_GIB:.0f} GiB goes to the CUDA context "
        f"and fragmentation): {estimate}.{advice} The estimate is approximate; the run may still fit."
    )


def warn_if_too_big(config: TrainConfig, device: torch.device | str) -> None:
    """Warn (`MemoryWarning`) when the estimated peak does not fit the CUDA card `device`; other devices pass.

    A warning, not an error: the estimate is approximate, and the user may know better.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    message = fit_warning(config, torch.cuda.get_device_properties(device).total_memory / GIB)
    if message:
        warnings.warn(message, MemoryWarning, stacklevel=2)


def memory_table(configs: Mapping[str, TrainConfig], gpus: Mapping[str, float] = REFERENCE_GPUS) -> str:
    """A Markdown table: each named configuration's estimate, its parts, and whether it fits each GPU."""
    header = ["setting", "estimated peak", "weights + grads + optimiser", "activations", *gpus]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, config in configs.items():
        estimate = estimate_memory_gib(config)
        # The loop's parts (16-bit weight copies are weights too); the peak may come while caching or sampling.
        static = estimate.static + estimate.weight_copies
        fits = ["fits" if estimate.fits(gib) else "no" for gib in gpus.values()]
        cells = [name, f"{estimate.total:.1f} GiB", f"{static:.1f} GiB", f"{estimate.activations:.1f} GiB", *fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
