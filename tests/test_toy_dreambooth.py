"""The toy digit model ships as its build script made it, draws the digit it is asked for, and the toy DreamBooth
command writes the layout lessons and teachers rely on."""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib import cli, toy_dreambooth
from dreambooth_lib.models import build_pipeline
from dreambooth_lib.toy_dreambooth import (
    DigitClassifier,
    ToyExperiment,
    digit_accuracy,
    digit_samples,
    diversity,
    subject_distance,
    subject_images,
)
from dreambooth_lib.toy_model import (
    TOY_WEIGHTS,
    ToySettings,
    file_sha256,
    toy_components,
    toy_record,
    train_toy_unet,
    train_toy_vae,
    untrained_toy_components,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded losses were computed single-threaded, and the cores are shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier():
    return DigitClassifier()


def test_shipped_toy_weights_are_the_files_the_build_script_recorded():
    record = toy_record()
    assert sorted(record["sha256"]) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    for name, digest in record["sha256"].items():
        assert file_sha256(TOY_WEIGHTS / name) == digest, f"{name} differs from record.json: rerun the build script"


def test_build_script_reproduces_the_recorded_first_training_steps():
    record = toy_record()
    settings = ToySettings(**record["settings"])
    _, vae_losses = train_toy_vae(settings, steps=3, progress=False)
    np.testing.assert_allclose(vae_losses, record["vae_first_losses"][:3], rtol=1e-4)
    # The UNet stage trained on the VAE as shipped (frozen in float16 precision): start from it and the fresh weights.
    components = untrained_toy_components(settings.seed)
    components.vae = toy_components().vae
    unet_losses = train_toy_unet(components, settings, steps=3, progress=False)
    np.testing.assert_allclose(unet_losses, record["unet_first_losses"][:3], rtol=1e-4)


def test_digit_classifier_reads_held_out_digits(classifier):
    # Logistic regression on scikit-learn's 8x8 digits scores about 96% on held-out digits.
    assert classifier.holdout_accuracy > 0.93


def test_toy_base_draws_the_digit_each_prompt_names(classifier):
    samples = digit_samples(build_pipeline(toy_components()), 3)
    assert all(len(images) == 3 and images[0].size == (16, 16) for images in samples.values())
    # Chance is 10%; the build script's record says the base scores far above that.
    assert digit_accuracy(classifier, samples) >= 0.7


def test_subject_distance_and_diversity_are_pixel_distances():
    black, white = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)
    assert subject_distance([black, white], [white]) == pytest.approx(0.5)  # distances 1 and 0
    assert diversity([black, black]) == 0.0
    assert diversity([black, white]) == pytest.approx(1.0)
    stars = subject_images(4)
    assert subject_distance(stars, stars) == 0.0 and diversity(stars) > 0.05  # four different photos of one star


def images_in(folder) -> list[Image.Image]:
    return [Image.open(path).copy() for path in sorted(folder.glob("*.png"))]


def test_toy_command_writes_metrics_subject_and_grey_samples(tmp_path, monkeypatch, capsys, classifier):
    small = functools.partial(
        ToyExperiment,
        samples_per_digit=2,
        curve_samples_per_digit=1,
        num_class_images=2,
        guidance_scales=(1.0, toy_dreambooth.DEFAULT_GUIDANCE),
        overfitting_steps=(1,),
    )
    monkeypatch.setattr(toy_dreambooth, "ToyExperiment", small)
    assert cli.main(["toy", "--out", str(tmp_path), "--steps", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "with_prior", "without_prior"}
    assert set(metrics["overfitting_without_prior"]) == {"1", "2"}
    assert len(list((tmp_path / "subject").glob("*.png"))) == 4
    for model in ("base", "with_prior", "without_prior"):
        for k in range(10):
            files = sorted((tmp_path / "samples" / model / f"digit_{k}").glob("*.png"))
            assert len(files) == 2
            with Image.open(files[0]) as image:
                assert image.mode == "L" and image.size == (16, 16)
    assert len(list((tmp_path / "samples" / "with_prior" / "subject").glob("*.png"))) == 2
    # the overfitting run has samples too (fewer per digit: a point on a curve), and the figure shows it last
    assert len(list((tmp_path / "samples" / "without_prior_1_steps" / "digit_3").glob("*.png"))) == 1
    assert len(list((tmp_path / "samples" / "without_prior_1_steps" / "subject").glob("*.png"))) == 2
    three_rows = toy_dreambooth.samples_figure(tmp_path, per_prompt=1, models=["base", "with_prior", "without_prior"])
    assert toy_dreambooth.samples_figure(tmp_path, per_prompt=1).height > three_rows.height
    with Image.open(tmp_path / "samples.png") as picture:  # one picture of every model's samples
        assert picture.size == toy_dreambooth.samples_figure(tmp_path, per_prompt=3).size
    assert "digit accuracy" in capsys.readouterr().out
    # Every number in metrics.json is what its samples on disk give, recomputed here.
    subject = images_in(tmp_path / "subject")
    for model, row in metrics["models"].items():
        samples = tmp_path / "samples" / model
        digits = {k: images_in(samples / f"digit_{k}") for k in range(10)}
        assert row["digit_accuracy"] == pytest.approx(digit_accuracy(classifier, digits)), model
        identifier = images_in(samples / "subject")
        assert row["subject_distance"] == pytest.approx(subject_distance(identifier, subject)), model
        assert row["identifier_diversity"] == pytest.approx(diversity(identifier)), model


def test_toy_command_refuses_zero_steps_in_one_line(tmp_path, capsys):
    assert cli.main(["toy", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_toy_command_will_not_write_over_an_earlier_experiment(tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    assert cli.main(["toy", "--out", str(tmp_path)]) == 2
    assert "already holds a toy experiment" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_toy_config_with_lora_takes_the_lessons_lora_settings_and_overrides_still_win(tmp_path):
    settings = ToyExperiment()
    lora = toy_dreambooth.toy_config(tmp_path, "lora", with_prior=True, use_lora=True)
    assert (lora.use_lora, lora.lora_rank) == (True, settings.lora_rank)
    assert (lora.learning_rate, lora.max_steps) == (settings.lora_learning_rate, settings.lora_steps)
    full = toy_dreambooth.toy_config(tmp_path, "full", with_prior=True)
    assert (full.learning_rate, full.max_steps) == (settings.learning_rate, settings.steps)
    assert toy_dreambooth.toy_config(tmp_path, "short", with_prior=False, use_lora=True, max_steps=5).max_steps == 5


def test_the_lora_scale_reaches_the_pipeline(tmp_path):
    # Scale 0 must give the base model's picture back, scale 1 the trained one: generate() passes the scale through.
    from diffusers import DiffusionPipeline

    from dreambooth_lib.train import train

    config = toy_dreambooth.toy_config(
        tmp_path, "lora", with_prior=False, use_lora=True, max_steps=3, learning_rate=5e-2, validation_prompts=[]
    )
    run = train(config)
    base = toy_dreambooth.sample(build_pipeline(toy_components()), toy_dreambooth.IDENTIFIER_PROMPT, 2)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "base")
    pipeline.load_lora_weights(run.run_dir)

    def at(scale):
        images = toy_dreambooth.sample(
            pipeline, toy_dreambooth.IDENTIFIER_PROMPT, 2, cross_attention_kwargs={"scale": scale}
        )
        return np.stack([np.asarray(image, dtype=float) for image in images])

    reference = np.stack([np.asarray(image, dtype=float) for image in base])
    assert np.abs(at(0.0) - reference).max() <= 1  # one grey level of rounding
    assert np.abs(at(1.0) - reference).mean() > 5


def test_stacked_cells_keep_every_pixel_at_four_times_the_size():
    stars = subject_images(3)
    column = toy_dreambooth._stack(stars)
    assert column.size == (64, 192) and column.mode == "RGB"
    first = np.asarray(column.convert("L"))[:64:4, ::4]
    assert np.array_equal(first, np.asarray(stars[0]))
