"""The DreamBooth training objective: what the model should predict, the noise it sees, and how errors are weighted.

DreamBooth (Ruiz et al. 2023, https://arxiv.org/abs/2208.12242, eq. 2) fine-tunes on the usual diffusion loss over
the subject's images plus λ times the same loss over images the frozen model made of the subject's class (the
class-specific prior preservation loss), so the model learns the subject without forgetting what the class looks
like. The batch carries both: instance examples first, class examples second (see `data.collate_examples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dreambooth_lib.schedule import NoiseSchedule, gaussian_noise

if TYPE_CHECKING:  # only for the annotation: the loss needs nothing from text encoding
    from dreambooth_lib.text import PromptEmbeddings


def diffusion_target(
    schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model must predict from x_t: the noise ε (DDPM eq. 14) or the velocity v (Salimans & Ho, sec. 4).

    The schedule's prediction_type comes from the pretrained model's config (SD 1.x/SDXL: epsilon, SD 2.x 768: v).
    """
    if schedule.prediction_type == "epsilon":
        return noise
    return schedule.velocity(x0, noise, timesteps)


def sample_noise(
    latents: torch.Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ε ~ N(0, I) shaped like the latents, plus `offset_noise` times one N(0, 1) value per sample and channel.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"; diffusers' DreamBooth script adds 0.1 of it under
    `--offset_noise`, a flag the seed write-up's commands do not set) shifts each channel's mean, so the model also
    learns to change an image's overall brightness, which plain noise leaves almost untouched (very dark or very
    bright images become reachable).
    """
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0 (0 turns it off; 0.1 is usual), got {offset_noise}")
    noise = gaussian_noise(latents.shape, latents, generator)
    if offset_noise == 0:
        return noise
    batch, channels = latents.shape[:2]
    per_channel = gaussian_noise((batch, channels, *([1] * (latents.ndim - 2))), latents, generator)
    return noise + offset_noise * per_channel


def min_snr_weights(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights, one per sample (Hang et al. 2023, https://arxiv.org/abs/2303.09556, eq. 8-10).

    Weighting the x_0 error by min(SNR, γ) stops the nearly noise-free timesteps dominating training. Expressed on
    the model's own target: min(SNR, γ) / SNR for epsilon (1 where SNR <= γ, also at SNR = 0) and
    min(SNR, γ) / (SNR + 1) for v. Float64 on the CPU; `dreambooth_loss` moves it.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 (the paper uses 5), got {gamma}")
    snr = schedule.snr(timesteps)
    if schedule.prediction_type == "epsilon":
        # min(SNR, γ) / SNR written as min(γ / SNR, 1): the same number, and 1 (not 0/0) at SNR = 0.
        return torch.clamp(gamma / snr, max=1.0)
    return torch.clamp(snr, max=gamma) / (snr + 1)


@dataclass
class LossParts:
    """The loss to back-propagate and its parts, for the log: total = instance + prior_weight * prior."""

    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor | None


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    with_prior: bool,
    prior_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> LossParts:
    """Instance MSE + prior_weight x class-prior MSE (DreamBooth eq. 2).

    With prior preservation the batch's first half holds the instance examples and its second half the class
    examples. Each sample's squared error is averaged over its elements, then over the samples of each half;
    `weights` (one per sample, e.g. `min_snr_weights`) multiply the per-sample errors before that mean. Computed in
    at least float32, whatever the model's precision.
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} must match")
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0 (0 turns the prior loss off), got {prior_weight}")
    batch = model_pred.shape[0]
    dtype = torch.promote_types(model_pred.dtype, torch.float32)
    errors = (model_pred.to(dtype) - target.to(dtype)) ** 2
    per_sample = errors.mean(dim=tuple(range(1, errors.ndim)))
    if weights is not None:
        if weights.shape != (batch,):
            raise ValueError(f"weights must have one value per sample, shape ({batch},), got {tuple(weights.shape)}")
        per_sample = per_sample * weights.to(device=per_sample.device, dtype=dtype)
    if not with_prior:
        instance = per_sample.mean()
        return LossParts(total=instance, instance=instance, prior=None)
    if batch % 2:
        raise ValueError(
            f"with prior preservation the batch holds instance then class examples in equal numbers; got {batch}"
        )
    instance, prior = per_sample[: batch // 2].mean(), per_sample[batch // 2 :].mean()
    return LossParts(total=instance + prior_weight * prior, instance=instance, prior=prior)


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
    `denoiser` is a `denoiser.Denoiser` (or anything called the same way).
    """
    noisy_latents = schedule.add_noise(latents, noise, timesteps)
    prediction = denoiser(noisy_latents, timesteps, prompt, time_ids, train_text)
    target = diffusion_target(schedule, latents, noise, timesteps)
    weights = min_snr_weights(schedule, timesteps, min_snr_gamma) if min_snr_gamma else None
    return dreambooth_loss(
        prediction.float(), target.float(), with_prior=with_prior, prior_weight=prior_weight, weights=weights
    )
