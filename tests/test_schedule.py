"""Our noise schedule and diffusion maths equal diffusers' DDPMScheduler / DDIMScheduler (float64, 1e-6).

diffusers keeps its tables (betas, alphas_cumprod) in float32. `test_tables_match_diffusers` compares the tables
themselves at that precision; every other comparison swaps our float64 tables into the diffusers scheduler, so what is
compared is the equations, in float64.
"""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from diffusers.training_utils import compute_snr

from dreambooth_lib.schedule import NoiseSchedule, make_betas, sample_loop

SCHEDULES = {
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
}
PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
T = 1000
SHAPE = (2, 3, 3)  # the sample dims after the batch: small, the maths is elementwise
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def _pair(scheduler_class, schedule, prediction_type="epsilon", **settings):
    """A diffusers scheduler and our NoiseSchedule from its config, the scheduler given our float64 tables."""
    scheduler = scheduler_class(
        num_train_timesteps=T, prediction_type=prediction_type, clip_sample=False, **SCHEDULES[schedule], **settings
    )
    ours = NoiseSchedule.from_config(scheduler.config)
    scheduler.betas, scheduler.alphas = ours.betas.clone(), ours.alphas.clone()
    scheduler.alphas_cumprod = ours.alphas_cumprod.clone()
    if scheduler_class is DDIMScheduler:
        scheduler.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    return scheduler, ours


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_terminal_snr"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_tables_match_diffusers(schedule, rescale):
    scheduler = DDPMScheduler(num_train_timesteps=T, rescale_betas_zero_snr=rescale, **SCHEDULES[schedule])
    ours = NoiseSchedule.from_config(scheduler.config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == torch.float64
    # Rescaled betas near t = T are ratios of tiny ᾱ values: diffusers' float32 loses a digit there.
    betas_tolerance = {"rtol": 1e-5, "atol": 1e-5} if rescale else TOLERANCE
    torch.testing.assert_close(ours.betas, scheduler.betas.double(), **betas_tolerance)
    torch.testing.assert_close(ours.alphas, scheduler.alphas.double(), **betas_tolerance)
    torch.testing.assert_close(ours.alphas_cumprod, scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)
    if rescale:
        assert ours.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)


def test_make_betas_has_the_documented_endpoints():
    torch.testing.assert_close(make_betas("linear")[[0, -1]], torch.tensor([0.0001, 0.02], dtype=torch.float64))
    scaled = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    torch.testing.assert_close(scaled[[0, -1]], torch.tensor([0.00085, 0.012], dtype=torch.float64))
    # √β is evenly spaced, so β is not: its steps grow.
    assert torch.allclose(scaled.sqrt().diff(), scaled.sqrt().diff()[0])
    assert scaled.diff()[-1] > 2 * scaled.diff()[0]
    assert make_betas("squaredcos_cap_v2").max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="beta_schedule 'sigmoid'.*linear, scaled_linear, squaredcos_cap_v2"):
        make_betas("sigmoid")


def test_from_config_reads_the_sd15_schedule():
    # SD 1.5's scheduler_config.json (a PNDM config), loaded the way models.py loads it.
    sd15 = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    ours = NoiseSchedule.from_config(DDPMScheduler.from_config(sd15.config).config)
    assert (ours.num_train_timesteps, ours.prediction_type, ours.steps_offset) == (1000, "epsilon", 1)
    assert ours.betas[0].item() == pytest.approx(0.00085) and ours.betas[-1].item() == pytest.approx(0.012)
    assert ours.final_alpha_cumprod == pytest.approx(ours.alphas_cumprod[0].item())
    assert ours.sampling_timesteps(4).tolist() == [751, 501, 251, 1]
    torch.testing.assert_close(NoiseSchedule.make().alphas_cumprod, ours.alphas_cumprod)


def test_from_tiny_components_config(tiny_sd):
    ours = NoiseSchedule.from_config(tiny_sd.noise_scheduler.config)
    torch.testing.assert_close(ours.alphas_cumprod, tiny_sd.noise_scheduler.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_bad_settings_are_refused_with_the_setting_named():
    with pytest.raises(TypeError, match="pass `scheduler.config`"):
        NoiseSchedule.from_config(DDPMScheduler())
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        NoiseSchedule.from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="timestep_spacing 'karras'"):
        NoiseSchedule.make(timestep_spacing="karras")
    schedule = NoiseSchedule.make()
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        schedule.add_noise(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([1000]))
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        schedule.sampling_timesteps(0)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_forward_process_and_velocity_match_diffusers_at_every_training_timestep(schedule, prediction_type):
    scheduler, ours = _pair(DDPMScheduler, schedule, prediction_type)
    x0, noise, timesteps = _randn(T, *SHAPE, seed=0), _randn(T, *SHAPE, seed=1), torch.arange(T)
    torch.testing.assert_close(ours.add_noise(x0, noise, timesteps), scheduler.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(ours.velocity(x0, noise, timesteps), scheduler.get_velocity(x0, noise, timesteps))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_predictions_invert_the_forward_process(schedule, prediction_type):
    _, ours = _pair(DDPMScheduler, schedule, prediction_type)
    timesteps = torch.arange(0, 995)  # the cosine schedule's last steps hold almost no signal to recover x_0 from
    x0, noise = _randn(len(timesteps), *SHAPE, seed=0), _randn(len(timesteps), *SHAPE, seed=1)
    noisy = ours.add_noise(x0, noise, timesteps)
    perfect = noise if prediction_type == "epsilon" else ours.velocity(x0, noise, timesteps)
    torch.testing.assert_close(ours.predict_x0(perfect, noisy, timesteps), x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.predict_epsilon(perfect, noisy, timesteps), noise, rtol=1e-6, atol=1e-6)


def test_results_take_the_samples_dtype_and_a_scalar_timestep_broadcasts():
    schedule = NoiseSchedule.make()
    x0 = torch.ones(3, 4, 2, 2, dtype=torch.float32)
    noisy = schedule.add_noise(x0, torch.zeros_like(x0), 500)
    assert noisy.dtype == torch.float32 and noisy.shape == x0.shape
    torch.testing.assert_close(noisy, x0 * schedule.alphas_cumprod[500].sqrt().float())


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_snr_matches_diffusers_training_utils(schedule):
    scheduler, ours = _pair(DDPMScheduler, schedule)
    snr = ours.snr(torch.arange(T))
    torch.testing.assert_close(snr, compute_snr(scheduler, torch.arange(T)).double(), rtol=1e-6, atol=0)
    assert (snr.diff() < 0).all()  # more noise, less signal


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_sampling_timesteps_match_diffusers_for_every_step_count(steps_offset):
    for spacing in SPACINGS:
        scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=steps_offset)
        ours = NoiseSchedule.from_config(scheduler.config)
        for steps in range(1, T + 1):
            scheduler.set_timesteps(steps)
            timesteps = ours.sampling_timesteps(steps)
            assert len(timesteps) == steps
            # diffusers' trailing spacing sometimes appends a stray -1 (a float arange overshooting); we keep n.
            if len(scheduler.timesteps) != steps:
                assert spacing == "trailing" and scheduler.timesteps[-1] == -1
            assert torch.equal(timesteps, scheduler.timesteps[:steps]), (spacing, steps)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_step_matches_diffusers_at_every_training_timestep(schedule, prediction_type):
    scheduler, ours = _pair(DDPMScheduler, schedule, prediction_type)
    sample, model_output = _randn(T, *SHAPE, seed=0), _randn(T, *SHAPE, seed=1)
    expected, noises = [], []
    for t in range(T):
        # diffusers draws the step's noise from the generator (only when t > 0); we draw the same noise up front.
        noises.append(_randn(*SHAPE, seed=t))
        generator = torch.Generator().manual_seed(t)
        expected.append(scheduler.step(model_output[t], t, sample[t], generator=generator).prev_sample)
    timesteps = torch.arange(T)
    ours_prev = ours.ddpm_step(model_output, timesteps, sample, noise=torch.stack(noises))
    torch.testing.assert_close(ours_prev, torch.stack(expected), **TOLERANCE)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_step_matches_diffusers_across_sampling_spacings(schedule, prediction_type):
    for spacing in SPACINGS:
        scheduler, ours = _pair(DDPMScheduler, schedule, prediction_type, timestep_spacing=spacing, steps_offset=1)
        for steps in (7, 25):
            scheduler.set_timesteps(steps)
            timesteps = ours.sampling_timesteps(steps).tolist()
            for index, t in enumerate(timesteps):
                prev_t = timesteps[index + 1] if index + 1 < steps else -1
                sample, model_output = _randn(1, *SHAPE, seed=index), _randn(1, *SHAPE, seed=100 + index)
                expected = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(index))
                ours_prev = ours.ddpm_step(
                    model_output, t, sample, prev_t=prev_t, generator=torch.Generator().manual_seed(index)
                )
                torch.testing.assert_close(ours_prev, expected.prev_sample, **TOLERANCE, msg=f"{spacing} {steps} {t}")


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_step_matches_diffusers_across_spacings_and_eta(schedule, prediction_type, set_alpha_to_one):
    for spacing in SPACINGS:
        scheduler, ours = _pair(
            DDIMScheduler,
            schedule,
            prediction_type,
            timestep_spacing=spacing,
            steps_offset=1,
            set_alpha_to_one=set_alpha_to_one,
        )
        for steps in (10, 7, 50):
            scheduler.set_timesteps(steps)
            timesteps = ours.sampling_timesteps(steps)
            # diffusers' DDIM always steps back by T // n, whatever the spacing: we pass the same prev_t.
            prev_timesteps = timesteps - T // steps
            sample, model_output = _randn(steps, *SHAPE, seed=steps), _randn(steps, *SHAPE, seed=steps + 1)
            noise = _randn(steps, *SHAPE, seed=steps + 2)
            for eta in (0.0, 0.3, 1.0):
                expected = torch.stack(
                    [
                        scheduler.step(model_output[i], t, sample[i], eta=eta, variance_noise=noise[i]).prev_sample
                        for i, t in enumerate(timesteps.tolist())
                    ]
                )
                ours_prev = ours.ddim_step(model_output, timesteps, prev_timesteps, sample, eta=eta, noise=noise)
                torch.testing.assert_close(ours_prev, expected, **TOLERANCE, msg=f"{spacing} {steps} eta={eta}")


def _denoiser(sample, timesteps):
    """A stand-in for the UNet: any deterministic function of (x_t, t) will do for comparing the samplers."""
    return 0.5 * sample + 1e-3 * timesteps.view(-1, 1, 1, 1).to(sample.dtype)


@pytest.mark.parametrize(
    ("method", "spacing", "eta"),
    [("ddim", "leading", 0.0), ("ddim", "trailing", 0.7), ("ddpm", "leading", None), ("ddpm", "linspace", None)],
)
def test_sample_loop_equals_a_diffusers_sampling_loop(method, spacing, eta):
    scheduler_class = DDIMScheduler if method == "ddim" else DDPMScheduler
    settings = {"set_alpha_to_one": False} if method == "ddim" else {}
    scheduler, ours = _pair(
        scheduler_class,
        "scaled_linear",
        timestep_spacing=spacing,
        steps_offset=1 if spacing == "leading" else 0,
        **settings,
    )
    shape, steps = (2, 4, 3, 3), 10
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(shape, generator=generator, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_output = _denoiser(sample, t.repeat(shape[0]))
        step_options = {"eta": eta} if method == "ddim" else {}
        sample = scheduler.step(model_output, t, sample, generator=generator, **step_options).prev_sample
    result, chain = sample_loop(
        _denoiser,
        ours,
        shape,
        steps,
        method=method,
        eta=eta or 0.0,
        generator=torch.Generator().manual_seed(0),
        keep_chain=True,
        progress=False,
        dtype=torch.float64,
    )
    torch.testing.assert_close(result, sample, **TOLERANCE)
    assert len(chain) == steps + 1 and torch.equal(chain[-1], result)


def test_ddpm_sampling_is_reproducible_under_a_seed_and_differs_across_seeds():
    schedule = NoiseSchedule.make()
    runs = [
        sample_loop(_denoiser, schedule, (1, 2, 2, 2), 5, method="ddpm", generator=torch.Generator().manual_seed(s))[0]
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
