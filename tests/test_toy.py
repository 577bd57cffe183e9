"""The from-scratch experiments behind notebooks 02 and 03 learn, and the figures' tensor-to-picture helper is exact."""

from pathlib import Path

import pytest
import torch

from dreambooth_lib.models import tiny_components
from dreambooth_lib.plots import tensor_to_pil
from dreambooth_lib.schedule import NoiseSchedule, sample_loop
from dreambooth_lib.toy import (
    as_denoise_fn,
    digit_denoiser,
    digit_images,
    reconstruction_error,
    subject_pixels,
    train_denoiser,
    warm_up_vae,
)

SUBJECTS = Path(__file__).resolve().parent.parent / "data" / "subjects"


@pytest.fixture(autouse=True)
def _few_threads():
    # Many test modules share two cores: keep this one from taking them all.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digit_images_are_scikit_learns_digits_in_the_model_pixel_range():
    images = digit_images(size=8)
    assert images.shape == (1797, 1, 8, 8)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    # At 8 px the bilinear resize is the identity: the first digit (a zero) has its hole in the middle.
    assert images[0, 0, 3, 3].item() == -1.0 and images[0, 0, 1, 3].item() > 0.5


def test_digit_images_refuse_a_size_the_denoiser_cannot_halve_twice():
    with pytest.raises(ValueError, match="multiple of 4"):
        digit_images(size=10)


def test_denoiser_loss_falls_and_its_samples_use_the_schedule():
    schedule = NoiseSchedule.make("squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=0)
    model = digit_denoiser(size=8, channels=(8, 16), seed=0)
    losses = train_denoiser(model, digit_images(size=8), schedule, steps=60, batch_size=32, progress=False)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    # An untrained epsilon model scores about 1 (the noise's variance); learning halves that within 60 steps.
    assert first > 0.7 and last < 0.5 * first
    generator = torch.Generator().manual_seed(0)
    samples, chain = sample_loop(
        as_denoise_fn(model), schedule, (2, 1, 8, 8), 5, generator=generator, keep_chain=True, progress=False
    )
    assert len(chain) == 6 and torch.equal(chain[-1], samples)
    assert not model.training


def test_vae_warm_up_lowers_reconstruction_error():
    vae = tiny_components("sd", seed=1).vae  # its own copy: warming up changes the weights in place
    pixels = subject_pixels([SUBJECTS / "dog"], resolution=64)[:2]
    before = reconstruction_error(vae, pixels)
    losses = warm_up_vae(vae, pixels, steps=40, progress=False)
    after = reconstruction_error(vae, pixels)
    assert len(losses) == 40 and not vae.training
    # Random weights output a texture that ignores the input (error ~0.3-0.45); 40 steps on two photos halve that.
    assert before > 0.2 and after < 0.5 * before


def test_subject_pixels_stacks_every_photo_of_every_folder():
    pixels = subject_pixels([SUBJECTS / "dog", SUBJECTS / "teapot"], resolution=32)
    assert pixels.shape == (10, 3, 32, 32) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min().item() < -0.5 and 0.5 < pixels.max().item() <= 1.0


def test_tensor_to_pil_maps_the_pixel_range_to_bytes():
    rgb = tensor_to_pil(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 2, 2))
    assert rgb.mode == "RGB" and rgb.size == (2, 2) and rgb.getpixel((0, 0)) == (0, 128, 255)
    grey = tensor_to_pil(torch.full((1, 3, 4), 2.0))  # out-of-range values are clipped, not wrapped
    assert grey.mode == "L" and grey.size == (4, 3) and grey.getpixel((0, 0)) == 255
    with pytest.raises(ValueError, match="shape"):
        tensor_to_pil(torch.zeros(4, 2, 2))
