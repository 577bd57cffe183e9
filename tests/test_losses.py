"""The DreamBooth loss, its target, min-SNR weights and offset noise do what their definitions say."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dreambooth_lib.losses import LossParts, diffusion_target, dreambooth_loss, min_snr_weights, sample_noise
from dreambooth_lib.schedule import NoiseSchedule

T = 1000


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_target_is_the_noise_or_diffusers_velocity(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    schedule = NoiseSchedule.from_config({**scheduler.config, "prediction_type": prediction_type})
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()  # compare the equation in float64
    x0, noise, timesteps = _randn(T, 2, 2, 2, seed=0), _randn(T, 2, 2, 2, seed=1), torch.arange(T)
    target = diffusion_target(schedule, x0, noise, timesteps)
    expected = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)


def test_loss_equals_a_hand_computation():
    # Batch of 4 (2 instance, then 2 class), 1 channel, 2 elements each; prediction 0, so the errors are the targets².
    target = torch.tensor([[[1.0, 3.0]], [[2.0, 0.0]], [[1.0, 1.0]], [[0.0, 2.0]]], dtype=torch.float64)
    parts = dreambooth_loss(torch.zeros_like(target), target, with_prior=True, prior_weight=0.5)
    # per sample: (1 + 9)/2 = 5, (4 + 0)/2 = 2 | (1 + 1)/2 = 1, (0 + 4)/2 = 2
    assert parts.instance.item() == pytest.approx((5 + 2) / 2)
    assert parts.prior.item() == pytest.approx((1 + 2) / 2)
    assert parts.total.item() == pytest.approx(3.5 + 0.5 * 1.5)


def test_without_prior_the_loss_is_plain_mse_over_the_whole_batch():
    pred, target = _randn(3, 4, 2, 2, seed=0), _randn(3, 4, 2, 2, seed=1)
    parts = dreambooth_loss(pred, target, with_prior=False)
    assert isinstance(parts, LossParts) and parts.prior is None
    torch.testing.assert_close(parts.total, F.mse_loss(pred, target))
    assert torch.equal(parts.total, parts.instance)


def test_prior_weight_zero_gives_the_plain_instance_loss():
    pred, target = _randn(4, 4, 2, 2, seed=0), _randn(4, 4, 2, 2, seed=1)
    parts = dreambooth_loss(pred, target, with_prior=True, prior_weight=0.0)
    torch.testing.assert_close(parts.total, F.mse_loss(pred[:2], target[:2]))
    torch.testing.assert_close(parts.prior, F.mse_loss(pred[2:], target[2:]))  # still reported, for the log
    weighted = dreambooth_loss(pred, target, with_prior=True, prior_weight=2.0)
    torch.testing.assert_close(weighted.total, parts.instance + 2.0 * parts.prior)


def test_half_precision_predictions_are_scored_in_float32():
    pred, target = torch.full((2, 1, 8, 8), 1.0, dtype=torch.float16), torch.zeros(2, 1, 8, 8, dtype=torch.float16)
    assert dreambooth_loss(pred, target, with_prior=False).total.dtype == torch.float32


def test_bad_batches_and_settings_are_refused():
    pred = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="instance then class examples in equal numbers; got 3"):
        dreambooth_loss(pred, pred, with_prior=True)
    with pytest.raises(ValueError, match="must match"):
        dreambooth_loss(pred, pred[:2], with_prior=False)
    with pytest.raises(ValueError, match="prior_weight must be >= 0"):
        dreambooth_loss(pred[:2], pred[:2], with_prior=True, prior_weight=-1.0)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(3,\)"):
        dreambooth_loss(pred, pred, with_prior=False, weights=torch.ones(2))
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        min_snr_weights(NoiseSchedule.make(), torch.tensor([1]), 0.0)
    with pytest.raises(ValueError, match="offset_noise must be >= 0"):
        sample_noise(pred, -0.1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_their_definition(prediction_type):
    schedule = NoiseSchedule.make(prediction_type=prediction_type)
    timesteps, gamma = torch.arange(T), 5.0
    snr = schedule.snr(timesteps)
    weights = min_snr_weights(schedule, timesteps, gamma)
    denominator = snr if prediction_type == "epsilon" else snr + 1
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / denominator)
    low_snr, high_snr = snr < gamma, snr > gamma
    assert low_snr.any() and high_snr.any()
    if prediction_type == "epsilon":
        # Noisy timesteps keep full weight; the nearly clean ones (SNR far above γ) are damped by γ / SNR.
        assert torch.equal(weights[low_snr], torch.ones(int(low_snr.sum()), dtype=torch.float64))
        assert weights[0].item() == pytest.approx(gamma / snr[0].item()) and weights[0] < 0.01
    else:
        torch.testing.assert_close(weights[low_snr], snr[low_snr] / (snr[low_snr] + 1))
    assert (weights[high_snr] < 1).all()


def test_min_snr_weight_is_one_not_nan_at_zero_terminal_snr():
    schedule = NoiseSchedule.make(rescale_betas_zero_snr=True)
    assert schedule.snr(torch.tensor([T - 1])).item() == pytest.approx(0.0, abs=1e-12)
    assert min_snr_weights(schedule, torch.tensor([T - 1]), 5.0).tolist() == [1.0]


def test_min_snr_weights_scale_each_samples_error_in_the_loss():
    schedule = NoiseSchedule.make()
    timesteps = torch.tensor([10, 900, 20, 800])
    pred, target = _randn(4, 4, 2, 2, seed=0), _randn(4, 4, 2, 2, seed=1)
    weights = min_snr_weights(schedule, timesteps, 5.0)
    parts = dreambooth_loss(pred, target, with_prior=True, weights=weights)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(parts.instance, (weights[:2] * per_sample[:2]).mean())
    torch.testing.assert_close(parts.prior, (weights[2:] * per_sample[2:]).mean())
    # t = 10 and 20 have SNR far above 5: their errors count for much less than without weighting.
    assert parts.total < dreambooth_loss(pred, target, with_prior=True).total


def test_sample_noise_without_offset_is_standard_normal_noise():
    latents = torch.zeros(2, 4, 8, 8)
    noise = sample_noise(latents, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noise, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_offset_noise_adds_a_per_channel_constant_with_the_expected_variance():
    latents, offset = torch.zeros(2000, 4, 3, 3, dtype=torch.float64), 0.1
    plain = sample_noise(latents, generator=torch.Generator().manual_seed(0))
    with_offset = sample_noise(latents, offset, generator=torch.Generator().manual_seed(0))
    shift = with_offset - plain  # the same first draw, so only the offset term remains
    assert shift.dtype == torch.float64 and shift.shape == latents.shape
    # Constant over each sample's channel (the whole H x W plane moves together) ...
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    # ... and offset x N(0, 1) across samples and channels: mean 0, variance offset² (8000 draws: ~2% sampling error).
    per_channel = shift[:, :, 0, 0]
    assert per_channel.mean().item() == pytest.approx(0.0, abs=0.01)
    assert per_channel.var().item() == pytest.approx(offset**2, rel=0.08)
    assert with_offset.var().item() == pytest.approx(1 + offset**2, rel=0.03)
