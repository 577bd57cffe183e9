"""The noise schedule and the diffusion maths: the forward process q(x_t | x_0) and the DDPM and DDIM reverse steps.

Notation follows the papers, with ᾱ written `alpha_bar`:
- DDPM: Ho et al. 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239
- DDIM: Song et al. 2021, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502
- v-prediction: Salimans & Ho 2022, "Progressive Distillation for Fast Sampling", https://arxiv.org/abs/2202.00512
- timestep spacings: Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2,
  https://arxiv.org/abs/2305.08891

This is our own code, not a wrapper: `tests/test_schedule.py` proves it equal to diffusers' `DDPMScheduler` and
`DDIMScheduler`. A `NoiseSchedule` is built from a pretrained model's scheduler config, so training adds noise
exactly as the model was trained to remove it. The tables are float64 (diffusers keeps float32): every coefficient
is computed in float64 and cast to the sample's dtype at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

Timesteps = int | torch.Tensor


def make_betas(
    beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02
) -> torch.Tensor:
    """The variances β_1..β_T of the forward process's steps, float64, shape [num_train_timesteps].

    - "linear": DDPM's schedule, β evenly spaced from beta_start to beta_end (DDPM section 4).
    - "scaled_linear": Stable Diffusion's, √β evenly spaced (the latent diffusion models' schedule).
    - "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal 2021 (eq. 17), β capped at 0.999;
      beta_start and beta_end are unused.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(num_train_timesteps)
    raise ValueError(f"beta_schedule {beta_schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)}")


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 - ᾱ(t/T) / ᾱ((t-1)/T) with ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2) (improved DDPM, eq. 17)."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    # The cap keeps the last steps from destroying the signal in one jump (the paper's clipping to 0.999).
    betas = [
        min(1 - alpha_bar((t + 1) / num_train_timesteps) / alpha_bar(t / num_train_timesteps), max_beta)
        for t in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last step is pure noise (ᾱ_T = 0) and the first is unchanged (Lin et al., Alg. 1)."""
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def gaussian_noise(
    shape: tuple[int, ...] | torch.Size, like: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard normal noise with `like`'s dtype and device, drawn on the generator's device when one is given.

    Drawing on the generator's device (then moving) is what diffusers does, so a seeded CPU generator gives the same
    noise whatever device the sample lives on.
    """
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


@dataclass
class NoiseSchedule:
    """A diffusion model's noise schedule (float64 tables) and the maths on top of it.

    Timesteps index the tables from 0 (least noise) to num_train_timesteps - 1 (most). Every method takes timesteps
    as an int, a 0-d tensor or a LongTensor of shape [B] (one per sample, broadcast over the other dims) and returns
    the sample's dtype and device.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    # ᾱ that DDIM uses after the last sampling step: 1 ("set_alpha_to_one", a clean image) or ᾱ_0.
    final_alpha_cumprod: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; "
                f"use one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        for name in ("betas", "alphas", "alphas_cumprod"):
            if getattr(self, name).shape != (self.num_train_timesteps,):
                raise ValueError(f"{name} must have shape ({self.num_train_timesteps},) = (num_train_timesteps,)")

    # ---------------------------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def make(
        cls,
        beta_schedule: str = "scaled_linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        *,
        prediction_type: str = "epsilon",
        steps_offset: int = 1,
        timestep_spacing: str = "leading",
        set_alpha_to_one: bool = False,
        rescale_betas_zero_snr: bool = False,
        trained_betas: Any = None,
    ) -> NoiseSchedule:
        """Build a schedule from its settings; the defaults are the training schedule of SD 1.x and SDXL."""
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float64).flatten()
            num_train_timesteps = len(betas)
        else:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        # α_t = 1 - β_t and ᾱ_t = ∏_{s<=t} α_s (DDPM, above eq. 4).
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            num_train_timesteps=num_train_timesteps,
            steps_offset=steps_offset,
            timestep_spacing=timestep_spacing,
            final_alpha_cumprod=1.0 if set_alpha_to_one else alphas_cumprod[0].item(),
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """The schedule a pretrained model was trained with, from its scheduler config (`scheduler.config` or a dict).

        Missing settings take diffusers' `DDIMScheduler` defaults. Sampling-only settings (clip_sample, thresholding,
        variance_type) are not used: the steps here never clip x_0 (latent models do not) and DDPM uses the
        fixed-small variance.
        """
        if not isinstance(config, Mapping):
            raise TypeError(
                f"NoiseSchedule.from_config expects a scheduler config (a mapping), got {type(config).__name__}; "
                "pass `scheduler.config`, e.g. NoiseSchedule.from_config(components.noise_scheduler.config)"
            )
        return cls.make(
            beta_schedule=config.get("beta_schedule", "linear"),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            prediction_type=config.get("prediction_type", "epsilon"),
            steps_offset=config.get("steps_offset", 0),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            set_alpha_to_one=config.get("set_alpha_to_one", True),
            rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
            trained_betas=config.get("trained_betas"),
        )

    # ---------------------------------------------------------------------------------------------------------------
    # Table look-ups (float64 on the CPU; cast to the sample's dtype and device by `_per_sample`)

    def _alpha_bar(self, timesteps: Timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps).long().cpu()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.min().item()}..{t.max().item()}"
            )
        return self.alphas_cumprod[t]

    def _alpha_bar_prev(self, prev_timesteps: Timesteps, after_last: float) -> torch.Tensor:
        """ᾱ at the step the reverse process moves to; a negative timestep means "past the last step"."""
        prev = torch.as_tensor(prev_timesteps).long().cpu()
        alpha_bar = self.alphas_cumprod[prev.clamp(min=0)]
        return torch.where(prev >= 0, alpha_bar, torch.full_like(alpha_bar, after_last))

    # ---------------------------------------------------------------------------------------------------------------
    # Forward process and training targets

    def _levels(self, timesteps: Timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1 - ᾱ_t)): how much signal and how much noise x_t holds, shaped to broadcast over `like`."""
        alpha_bar = self._alpha_bar(timesteps)
        return _per_sample(alpha_bar.sqrt(), like), _per_sample((1 - alpha_bar).sqrt(), like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, a sample of q(x_t | x_0) (DDPM eq. 4)."""
        signal, noise_level = self._levels(timesteps, x0)
        return signal * x0 + noise_level * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """v_t = √ᾱ_t ε - √(1 - ᾱ_t) x_0, the v-prediction target (Salimans & Ho, section 4)."""
        signal, noise_level = self._levels(timesteps, x0)
        return signal * noise - noise_level * x0

    def snr(self, timesteps: Timesteps) -> torch.Tensor:
        """Signal-to-noise ratio SNR(t) = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, eq. 1), float64 on the CPU."""
        alpha_bar = self._alpha_bar(timesteps)
        return alpha_bar / (1 - alpha_bar)

    def predict_x0(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """The model's estimate of x_0 in x_t."""
        signal, noise_level = self._levels(timesteps, sample)
        if self.prediction_type == "epsilon":
            # x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t   (DDPM eq. 4 solved for x_0; DDIM eq. 12's "predicted x_0")
            return (sample - noise_level * model_output) / signal
        # x_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v   (Salimans & Ho, section 4)
        return signal * sample - noise_level * model_output

    def predict_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: Timesteps) -> torch.Tensor:
        """The model's estimate of the noise ε in x_t."""
        if self.prediction_type == "epsilon":
            return model_output
        # ε = √ᾱ_t v + √(1 - ᾱ_t) x_t   (Salimans & Ho, section 4)
        signal, noise_level = self._levels(timesteps, sample)
        return signal * model_output + noise_level * sample

    # ---------------------------------------------------------------------------------------------------------------
    # Sampling

    def sampling_timesteps(self, num_inference_steps: int, spacing: str | None = None) -> torch.Tensor:
        """The timesteps a sampler visits, descending (Lin et al., Table 2). spacing defaults to the config's.

        - "leading": 0, k, 2k, ... (k = T // n) plus steps_offset: the last step is near 0, the first well below T.
        - "trailing": T-1, T-1-T/n, ...: starts at the noisiest step (better at few steps).
        - "linspace": n evenly spaced values from 0 to T-1, rounded.
        Computed with the same numpy float arithmetic as diffusers so that ties (e.g. 499.5) round the same way.
        """
        spacing = spacing or self.timestep_spacing
        steps, total = num_inference_steps, self.num_train_timesteps
        if not 1 <= steps <= total:
            raise ValueError(f"num_inference_steps must be in [1, {total}] (num_train_timesteps), got {steps}")
        if spacing == "leading":
            timesteps = np.arange(steps)[::-1] * (total // steps) + self.steps_offset
        elif spacing == "trailing":
            # arange with a float step can overshoot by one element (to -1): keep exactly n.
            timesteps = np.round(np.arange(total, 0, -total / steps))[:steps] - 1
        elif spacing == "linspace":
            timesteps = np.linspace(0, total - 1, steps).round()[::-1]
        else:
            raise ValueError(f"spacing {spacing!r} is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")
        return torch.from_numpy(timesteps.astype(np.int64).copy())

    def ddpm_step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        sample: torch.Tensor,
        prev_t: Timesteps | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{prev_t} ~ p(x_{prev_t} | x_t) with the fixed-small variance β̃ (DDPM eq. 6-7).

        prev_t defaults to t - 1; a larger jump (fewer sampling steps) uses the β of the jump, 1 - ᾱ_t / ᾱ_prev.
        A negative prev_t means the final step, to ᾱ = 1 (a clean sample, no noise added). The noise is drawn from
        `generator` unless given.
        """
        prev_t = torch.as_tensor(t).long() - 1 if prev_t is None else prev_t
        alpha_bar = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar_prev(prev_t, after_last=1.0)
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha
        x0 = self.predict_x0(model_output, sample, t)
        # μ̃_t(x_t, x_0) = √ᾱ_{t-1} β_t / (1 - ᾱ_t) x_0 + √α_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t) x_t   (DDPM eq. 7)
        x0_coefficient = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
        sample_coefficient = alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
        mean = _per_sample(x0_coefficient, sample) * x0 + _per_sample(sample_coefficient, sample) * sample
        # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t   (DDPM eq. 7): zero on the final step.
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
        if not (variance > 0).any():
            return mean
        if noise is None:
            noise = gaussian_noise(sample.shape, sample, generator)
        return mean + _per_sample(variance.sqrt(), sample) * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        t: Timesteps,
        prev_t: Timesteps,
        sample: torch.Tensor,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One DDIM step x_t -> x_{prev_t} (DDIM eq. 12); eta = 0 is deterministic, eta = 1 is DDPM's variance.

        A negative prev_t means the final step, to ᾱ = final_alpha_cumprod (the config's set_alpha_to_one). The noise
        (used only when eta > 0) is drawn from `generator` unless given.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
        alpha_bar = self._alpha_bar(t)
        alpha_bar_prev = self._alpha_bar_prev(prev_t, after_last=self.final_alpha_cumprod)
        x0 = self.predict_x0(model_output, sample, t)
        epsilon = self.predict_epsilon(model_output, sample, t)
        # σ_t(η) = η √((1 - ᾱ_{t-1}) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_{t-1})   (DDIM eq. 16)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        # x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z   (DDIM eq. 12)
        direction = (1 - alpha_bar_prev - sigma**2).sqrt()
        prev_sample = _per_sample(alpha_bar_prev.sqrt(), sample) * x0 + _per_sample(direction, sample) * epsilon
        if eta == 0:
            return prev_sample
        if noise is None:
            noise = gaussian_noise(sample.shape, sample, generator)
        return prev_sample + _per_sample(sigma, sample) * noise


def _per_sample(coefficient: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient ([B] or scalar, float64) shaped to broadcast over `like`, in its dtype and device."""
    if coefficient.ndim == 1:
        coefficient = coefficient.reshape(-1, *([1] * (like.ndim - 1)))
    return coefficient.to(device=like.device, dtype=like.dtype)


def sample_loop(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    num_inference_steps: int = 50,
    method: str = "ddim",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    keep_chain: bool = False,
    progress: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generate from pure noise x_T ~ N(0, I) by repeated reverse steps; for notebooks, with any denoiser.

    `denoise(x_t, timesteps)` returns the model output (epsilon or v, as the schedule says) for a batch, with
    timesteps a LongTensor [B]. Each step goes to the next timestep of `schedule.sampling_timesteps`, and the last
    one past 0. Returns the final sample and, with keep_chain, every x_t on the CPU from x_T to the result.
    """
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    timesteps = schedule.sampling_timesteps(num_inference_steps).tolist()
    sample = gaussian_noise(shape, torch.empty(0, dtype=dtype, device=device), generator)
    chain = [sample.cpu()] if keep_chain else []
    for index, t in enumerate(tqdm(timesteps, desc=f"{method} sampling", disable=not progress)):
        prev_t = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        model_output = denoise(sample, torch.full((shape[0],), t, dtype=torch.long, device=device))
        if method == "ddim":
            sample = schedule.ddim_step(model_output, t, prev_t, sample, eta=eta, generator=generator)
        else:
            sample = schedule.ddpm_step(model_output, t, sample, prev_t=prev_t, generator=generator)
        if keep_chain:
            chain.append(sample.cpu())
    return sample, chain
