"""The DreamBooth paper's metrics on tiny random backbones: identities, directions, pairing and the protocol's table."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib import evaluate
from dreambooth_lib.evaluate import (
    PAPER_ROWS,
    ImageTransform,
    calibrate,
    clip_image_score,
    clip_text_score,
    dino_score,
    diversity_score,
    mean_pairwise_cosine,
    prior_preservation_score,
    protocol_prompts,
    tiny_backbones,
)
from dreambooth_lib.models import ModelSourceError

SUBJECTS = Path(__file__).resolve().parent.parent / "data" / "subjects"


@pytest.fixture(scope="module")
def backbones():
    return tiny_backbones()


@pytest.fixture(scope="module")
def dogs():
    return [Image.open(path).convert("RGB").resize((64, 64)) for path in sorted((SUBJECTS / "dog").glob("*.jpg"))]


@pytest.fixture(scope="module")
def teapots():
    return [Image.open(path).convert("RGB").resize((64, 64)) for path in sorted((SUBJECTS / "teapot").glob("*.jpg"))]


@pytest.fixture
def no_lpips(monkeypatch):
    monkeypatch.setattr(evaluate, "lpips_available", lambda: False)


def noised(image: Image.Image, strength: float, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 255.0 * strength, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def pixel_shuffled(image: Image.Image, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image).reshape(-1, 3)
    return Image.fromarray(
        pixels[np.random.default_rng(seed).permutation(len(pixels))].reshape(np.asarray(image).shape)
    )


def test_mean_pairwise_cosine_excludes_self_pairs_only_when_asked():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert mean_pairwise_cosine(a, a) == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    assert mean_pairwise_cosine(a, a, exclude_self=True) == pytest.approx(0.0)
    assert mean_pairwise_cosine(a, -a) == pytest.approx(-0.5)


def test_image_transform_normalises_with_the_models_statistics():
    transform = ImageTransform(32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    pixels = transform([Image.new("RGB", (80, 48), (255, 0, 51))])
    assert pixels.shape == (1, 3, 32, 32)
    assert pixels[0, :, 5, 7].tolist() == pytest.approx([1.0, -1.0, 0.2], abs=1e-6)


def test_identical_images_score_one_on_dino_and_clip_i(backbones, dogs):
    assert dino_score(backbones, [dogs[0]] * 2, [dogs[0]]) == pytest.approx(1.0, abs=1e-6)
    assert clip_image_score(backbones, [dogs[0]], [dogs[0]] * 3) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("score", [dino_score, clip_image_score])
def test_noised_and_shuffled_images_score_lower(backbones, dogs, score):
    for image in dogs[:3]:
        by_noise = [score(backbones, [noised(image, strength)], [image]) for strength in (0.0, 0.1, 0.3, 0.6)]
        assert by_noise[0] == pytest.approx(1.0, abs=1e-6)
        assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4  # strictly falling
        # Random weights squeeze every embedding into a narrow cone, hence small gaps; trained DINO's are wide.
        assert score(backbones, [pixel_shuffled(image)], [image]) < 1.0 - 1e-3


def test_clip_t_matches_clips_own_cosine_and_rewards_the_matching_prompt(backbones, dogs, teapots):
    # Random weights know no language, so let the model pick, among candidates, the prompt each image matches best.
    candidates = [f"a photo of a {thing}" for thing in ("dog", "teapot", "cat", "car", "house", "tree", "boat", "cup")]
    images = [dogs[0], teapots[0]]
    best = [max(candidates, key=lambda p, im=im: clip_text_score(backbones, [im], p)) for im in images]
    assert best[0] != best[1], "the constructed case needs two different matching prompts"

    # Reference: CLIP's own forward pass, logits_per_image = logit_scale * cosine(image, text).
    clip = backbones.clip
    tokens = backbones.tokenizer(best, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        output = clip(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=backbones.clip_transform(images),
        )
    cosine = output.logits_per_image / clip.logit_scale.exp()
    matching = clip_text_score(backbones, images, best)
    assert matching == pytest.approx(cosine.diagonal().mean().item(), abs=1e-5)

    swapped = clip_text_score(backbones, images, best[::-1])
    assert swapped == pytest.approx(cosine.fliplr().diagonal().mean().item(), abs=1e-5)
    assert matching > swapped  # an all-pairs mean (or a mix-up of pairs) would make these equal or reversed


def test_clip_t_refuses_mismatched_prompt_count(backbones, dogs):
    with pytest.raises(ValueError, match="one per image"):
        clip_text_score(backbones, dogs[:3], ["a dog", "a cat"])


def test_pres_is_higher_when_the_class_prompt_collapses_onto_the_subject(backbones, dogs, teapots):
    real = dogs[:3]
    drifted = prior_preservation_score(backbones, dogs[3:] + [noised(im, 0.05) for im in real], real)
    preserved = prior_preservation_score(backbones, teapots, real)
    assert drifted > preserved  # the paper: lower PRES = prior preserved; collapse onto the subject raises it


def test_diversity_fallback_is_zero_for_copies_and_grows_with_variety(backbones, dogs, teapots, no_lpips):
    copies, method = diversity_score(backbones, {"a dog": [dogs[0]] * 4})
    assert copies == pytest.approx(0.0, abs=1e-6)
    assert "fallback" in method
    near, _ = diversity_score(backbones, {"a dog": [noised(dogs[0], 0.05, seed) for seed in range(4)]})
    varied, _ = diversity_score(backbones, {"a dog": dogs[:2] + teapots[:2]})
    assert 0.0 < near < varied
    two_prompts, _ = diversity_score(backbones, {"p": [dogs[0]] * 2, "q": dogs[:2] + teapots[:2]})
    assert two_prompts == pytest.approx(varied / 2, abs=1e-6)  # the mean over prompts, not over pooled images


def test_diversity_uses_lpips_when_it_imports(backbones, dogs, monkeypatch):
    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()

        def forward(self, a, b):
            return (a - b).abs().mean()

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (0, 51, 255)]
    value, method = diversity_score(backbones, {"a dog": images})
    assert method.startswith("LPIPS")
    # Pixels in [-1, 1]: gaps 0.4, 2.0, 1.6 between the three grey levels.
    assert value == pytest.approx((0.4 + 2.0 + 1.6) / 3, abs=1e-5)


def test_diversity_needs_two_images_per_prompt(backbones, dogs):
    with pytest.raises(ValueError, match="at least two images per prompt"):
        diversity_score(backbones, {"a dog": dogs[:1]})


def test_protocol_prompts_follow_the_papers_templates():
    live = protocol_prompts("sks", "dog")
    objects = protocol_prompts("sks", "teapot")
    assert len(live) == len(objects) == 25
    assert ("a sks dog wearing a red hat", "a dog wearing a red hat") in live
    assert ("a sks teapot floating on top of water", "a teapot floating on top of water") in objects
    assert all("sks" not in plain for _, plain in live + objects)
    assert [p for p, _ in protocol_prompts("sks", "dog", live=False, count=2)] == [
        "a sks dog in the jungle",
        "a sks dog in the snow",
    ]
    with pytest.raises(ValueError, match="count=26"):
        protocol_prompts("sks", "dog", count=26)


def test_calibration_compares_real_images_without_self_pairs(backbones, dogs):
    result = calibrate(backbones, dogs)
    embeddings = torch.nn.functional.normalize(backbones.embed_dino(dogs).double(), dim=-1)
    similarity = embeddings @ embeddings.T
    n = len(dogs)
    assert result["DINO"] == pytest.approx(((similarity.sum() - n) / (n * n - n)).item(), abs=1e-9)
    assert result["CLIP-I"] < 1.0
    assert set(PAPER_ROWS["Real Images (paper)"]) == set(result)


def test_results_table_json_and_figures_show_our_rows_beside_the_papers(
    backbones, dogs, teapots, no_lpips, tmp_path, matplotlib_backend
):
    matplotlib_backend.use("Agg")
    prompts = {"a sks dog in the jungle": "a dog in the jungle", "a sks dog in the snow": "a dog in the snow"}
    images = dict(zip(prompts, (dogs[:2], dogs[2:4]), strict=True))
    result = evaluate.evaluate_images(backbones, images, prompts, teapots[:3], dogs, name="copies of the photos")
    assert set(result.scores) == set(evaluate.METRICS)
    assert result.scores["DINO"] == pytest.approx(dino_score(backbones, dogs[:4], dogs))
    assert result.scores["PRES"] == pytest.approx(dino_score(backbones, teapots[:3], dogs))

    table = evaluate.results_table([result])
    assert "| copies of the photos " in table and "| DreamBooth SD (paper)" in table and "0.668" in table
    assert "fallback" in table and result.clip_model in table
    saved = evaluate.save_results([result], tmp_path / "results.json").read_text()
    assert '"DINO"' in saved and "copies of the photos" in saved
    # One bar per metric for our run and for each of the two default paper rows.
    assert len(evaluate.metrics_bar_chart([result]).axes[0].patches) == 3 * len(evaluate.METRICS)
    assert len(evaluate.prompt_grid_figure(result).axes) == 3  # two prompts + the class prompt


def test_full_backbones_offline_fail_with_a_clear_error():
    with pytest.raises(ModelSourceError, match="dino-vits16"):
        evaluate.load_backbones(tiny=False, device="cpu")


def test_evaluate_command_scores_a_tiny_trained_run(tmp_path, capsys, no_lpips):
    import json

    from dreambooth_lib.cli import main
    from dreambooth_lib.train import TrainConfig, train

    subject = SUBJECTS / "dog"
    config = TrainConfig.preset(
        "tiny-cpu",
        instance_dir=str(subject),
        max_steps=1,
        with_prior_preservation=False,
        num_validation_images=1,
        output_dir=str(tmp_path / "tiny-run"),
    )
    run_dir = train(config).run_dir
    out = tmp_path / "evaluation"
    argv = ["evaluate", str(run_dir), "--instance-dir", str(subject), "--class-noun", "dog", "--identifier", "sks"]
    argv += ["--images-per-prompt", "2", "--prompts", "2", "--steps", "2", "--out", str(out)]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "calibration, real images against each other: DINO" in printed
    assert "| tiny-run " in printed and "| DreamBooth SD (paper)" in printed
    saved = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in saved["runs"]] == ["tiny-run"]
    assert set(saved["runs"][0]["scores"]) == set(evaluate.METRICS)
    assert saved["runs"][0]["prompts"] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert saved["paper"]["DreamBooth SD (paper)"]["CLIP-T"] == 0.305
    assert (out / "metrics.png").stat().st_size > 0 and (out / "tiny-run-grid.png").stat().st_size > 0
