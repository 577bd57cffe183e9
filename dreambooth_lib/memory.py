"""How much GPU memory a DreamBooth run needs: an analytic estimate from the settings, before anything loads.

Peak memory = weights + gradients + optimiser state + activations, each counted from the model family's parameter
counts and the settings of a `TrainConfig`. The assumptions, in one place:

- **Weights.** Trained weights are kept in fp32 (master weights; fp16 trainable weights break the gradient scaler),
  frozen ones in the compute precision (2 bytes under fp16/bf16 mixed precision, 4 bytes without).
- **Gradients.** One fp32 gradient per trained parameter.
- **Optimiser state.** AdamW keeps two fp32 moments (8 bytes per trained parameter), 8-bit AdamW two 8-bit moments
  (2 bytes, Dettmers et al. 2022), Prodigy four fp32 tensors (moments, its `s` and the initial weights: 16 bytes).
- **LoRA.** Only the adapters train: rank x (inputs + outputs) parameters per adapted layer (Hu et al. 2021), on the
  UNet's attention projections (to_q, to_k, to_v, to_out) and, with the text encoder, its q/k/v/out projections. The
  base weights count as frozen.
- **Activations.** A per-image figure at the family's native resolution for 16-bit compute with PyTorch's
  memory-efficient attention (so linear in the number of latent pixels), times the images per micro-batch
  (`train_batch_size`, doubled by prior preservation), times (resolution / native)^2; twice that in fp32, and a
  quarter of it with gradient checkpointing (only block inputs are kept; each block is recomputed in backward).
  These per-image figures are the rough part of the estimate; the benchmarks measure the real peaks.
- Not counted: the CUDA context (about 0.3-0.5 GiB outside PyTorch's allocator), allocator fragmentation, and
  sampling validation images.

Parameter counts are those of SD 1.5 and SDXL base 1.0 (SD 2.x is within a few percent of SD 1.5 in UNet size, its
text encoder is larger); the tiny components are counted from the real tiny modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from dreambooth_lib.config import TrainConfig

GIB = 2**30


@dataclass(frozen=True)
class FamilySize:
    """Parameter counts of one model family, and the numbers the activation estimate scales from."""

    unet: int
    text_encoders: tuple[int, ...]
    vae: int
    unet_lora_per_rank: int  # sum of (inputs + outputs) over the UNet's attention projections
    text_lora_per_rank: tuple[int, ...]  # the same over each text encoder's q/k/v/out projections
    native_resolution: int
    activation_gib_per_image: float  # 16-bit compute, no gradient checkpointing, native resolution


# UNet and VAE counts: the diffusers models built from the published configs; text encoders: CLIP ViT-L/14 (SD 1.5,
# SDXL's first) and OpenCLIP ViT-bigG/14 with projection (SDXL's second). LoRA sums: 12 layers x 4 projections x
# (768 + 768) for ViT-L, 32 x 4 x (1280 + 1280) for bigG.
FAMILIES: dict[str, FamilySize] = {
    "sd": FamilySize(
        unet=859_520_964,
        text_encoders=(123_060_480,),
        vae=83_653_863,
        unet_lora_per_rank=199_296,
        text_lora_per_rank=(73_728,),
        native_resolution=512,
        activation_gib_per_image=3.0,
    ),
    "sdxl": FamilySize(
        unet=2_567_463_684,
        text_encoders=(123_060_480, 694_659_840),
        vae=83_653_863,
        unet_lora_per_rank=1_451_520,
        text_lora_per_rank=(73_728, 327_680),
        native_resolution=1024,
        activation_gib_per_image=12.0,
    ),
}

OPTIMIZER_BYTES = {"adamw": 8, "adamw-8bit": 2, "prodigy": 16}
CHECKPOINTING_FACTOR = 0.25
# Cards people train DreamBooth on, by the memory they offer (GiB).
REFERENCE_GPUS: dict[str, float] = {"T4": 15.0, "A100 40 GB": 40.0}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak GPU memory of a training run, in GiB, by what holds it."""

    weights: float
    gradients: float
    optimizer_states: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations

    def fits(self, device_gib: float) -> bool:
        """Whether the estimate leaves ~1 GiB of the card free for the CUDA context and fragmentation."""
        return self.total <= device_gib - 1.0

    def __str__(self) -> str:
        # Tiny runs need megabytes: show MiB so their figures are not all 0.0.
        scale, unit = (1, "GiB") if self.total >= 1 else (1024, "MiB")
        parts = {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimiser": self.optimizer_states,
            "activations": self.activations,
        }
        detail = ", ".join(f"{name} {value * scale:.1f}" for name, value in parts.items())
        return f"~{self.total * scale:.1f} {unit} peak (estimate): {detail}"


@cache
def _tiny_family(kind: str) -> FamilySize:
    """Count the tiny components' parameters (and their LoRA sizes) from the modules themselves."""
    import torch

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
        activation_gib_per_image=0.002,
    )


def family_size(config: TrainConfig) -> FamilySize:
    """The parameter counts for the config's model: the tiny modules, or the full family of `config.kind`."""
    return _tiny_family(config.kind) if config.model == "tiny" else FAMILIES[config.kind]


def estimate_memory_gib(config: TrainConfig) -> MemoryEstimate:
    """Estimate the peak GPU memory of training with `config` (see the module docstring for the assumptions)."""
    size = family_size(config)
    frozen_bytes = 4 if config.mixed_precision == "no" else 2
    text_total = sum(size.text_encoders)
    if config.use_lora:
        trained = config.lora_rank * size.unet_lora_per_rank
        if config.train_text_encoder:
            trained += config.lora_rank * sum(size.text_lora_per_rank)
        frozen = size.unet + text_total + size.vae
    else:
        trained = size.unet + (text_total if config.train_text_encoder else 0)
        frozen = size.vae + (0 if config.train_text_encoder else text_total)
    optimizer = "adamw-8bit" if config.use_8bit_adam else config.optimizer

    images = config.train_batch_size * (2 if config.with_prior_preservation else 1)
    activations = size.activation_gib_per_image * images * (config.resolution / size.native_resolution) ** 2
    if config.mixed_precision == "no":
        activations *= 2
    if config.gradient_checkpointing:
        activations *= CHECKPOINTING_FACTOR
    return MemoryEstimate(
        weights=(4 * trained + frozen_bytes * frozen) / GIB,
        gradients=4 * trained / GIB,
        optimizer_states=OPTIMIZER_BYTES[optimizer] * trained / GIB,
        activations=activations,
    )


def memory_table(configs: Mapping[str, TrainConfig], gpus: Mapping[str, float] = REFERENCE_GPUS) -> str:
    """A Markdown table: each named configuration's estimate, its parts, and whether it fits each GPU."""
    header = ["setting", "estimated peak", "weights + grads + optimiser", "activations", *gpus]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, config in configs.items():
        estimate = estimate_memory_gib(config)
        static = estimate.weights + estimate.gradients + estimate.optimizer_states
        fits = ["fits" if estimate.fits(gib) else "no" for gib in gpus.values()]
        cells = [name, f"{estimate.total:.1f} GiB", f"{static:.1f} GiB", f"{estimate.activations:.1f} GiB", *fits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
