"""train(): it learns, it writes outputs the stock tools load, it resumes exactly, and it saves once under accelerate.

Runs are tiny (64 px, a few steps) and shared between tests through module-scoped fixtures.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib import cli, lora
from dreambooth_lib.checkpoints import latest_checkpoint, list_checkpoints, resolve_resume
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.denoiser import Denoiser
from dreambooth_lib.generate import generate
from dreambooth_lib.losses import diffusion_loss
from dreambooth_lib.models import build_pipeline, load_run_pipeline, tiny_components
from dreambooth_lib.schedule import NoiseSchedule
from dreambooth_lib.text import encode_prompt
from dreambooth_lib.train import train

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "data" / "subjects" / "dog"
SECRET = "hf_THIS_TOKEN_MUST_NEVER_BE_WRITTEN_0123456789"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine its waits cost seconds per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(
        instance_dir=str(DOG),
        output_dir=str(tmp_path / "run"),
        class_dir=str(tmp_path / "class_images"),
        num_class_images=2,
        class_inference_steps=2,
        max_steps=4,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    settings.update(overrides)
    return TrainConfig.preset("tiny-cpu", **settings)


def images_differ(first, second) -> float:
    """Mean absolute difference of two PIL images, 0..255."""
    return float(np.abs(np.asarray(first, dtype=np.float32) - np.asarray(second, dtype=np.float32)).mean())


# --------------------------------------------------------------------------------------------------------------------
# Learning, on a fixed batch: the loss and model wiring train() uses must make the loss fall.


# Full fine-tuning fits one batch almost exactly; rank-4 attention adapters on a random UNet reach less, but clearly.
@pytest.mark.parametrize(("use_lora", "falls_below"), [(False, 0.2), (True, 0.75)], ids=["full", "lora"])
def test_loss_falls_on_a_fixed_batch(use_lora, falls_below):
    torch.manual_seed(0)
    components = tiny_components("sd")
    if use_lora:
        parameters = lora.add_lora(components, rank=4)
        learning_rate = 1e-2
    else:
        parameters = list(components.unet.parameters())
        learning_rate = 1e-3
    denoiser = Denoiser(components, train_text_encoder=False).train()
    schedule = NoiseSchedule.from_config(components.noise_scheduler.config)
    latents = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([100, 700])
    prompt = encode_prompt(components, ["a photo of sks dog", "a photo of a dog"])
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, foreach=True)
    losses = []
    for _ in range(40):
        parts = diffusion_loss(denoiser, schedule, latents, prompt, noise, timesteps, with_prior=True)
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(parts.total.item())
    assert losses[-1] < falls_below * losses[0], losses
    # With prior preservation the total is instance + lambda * prior (lambda = 1 here).
    assert parts.total.item() == pytest.approx(parts.instance.item() + parts.prior.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Full fine-tune + text encoder + prior preservation: the run folder.


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("full")
    config = tiny_config(tmp_path, max_steps=4, checkpointing_steps=2, checkpoints_total_limit=1, validation_steps=2)
    os.environ["HF_TOKEN"] = SECRET
    try:
        result = train(config)
    finally:
        del os.environ["HF_TOKEN"]
    return config, result


def test_full_run_writes_the_documented_folder(full_run):
    config, result = full_run
    run = result.run_dir
    for name in ("config.json", "loss.csv", "loss.png", "samples.png", "README.md", "validation-2.png"):
        assert (run / name).is_file(), name
    assert result.output == run / "pipeline"
    assert TrainConfig.from_file(run / "config.json") == config
    # checkpoints_total_limit=1: only the newest of checkpoint-2 and checkpoint-4 is kept.
    assert [path.name for path in list_checkpoints(run / "checkpoints")] == ["checkpoint-4"]
    # Class images were generated into the class folder, exactly as many as asked for.
    assert len(list(Path(config.class_dir).glob("*.png"))) == config.num_class_images


def test_loss_log_has_every_step_and_the_prior_term(full_run):
    _, result = full_run
    rows = result.losses
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["prior_loss"] > 0 and row["instance_loss"] > 0
        assert row["loss"] == pytest.approx(row["instance_loss"] + row["prior_loss"], rel=1e-4)
    header = (result.run_dir / "loss.csv").read_text().splitlines()[0]
    assert header == "step,loss,instance_loss,prior_loss,lr"


def test_full_run_loads_in_the_stock_pipeline_with_changed_weights(full_run):
    from diffusers import StableDiffusionPipeline

    _, result = full_run
    pipeline = StableDiffusionPipeline.from_pretrained(result.output)
    base = tiny_components("sd")
    trained_unet = dict(pipeline.unet.named_parameters())
    trained_text = dict(pipeline.text_encoder.named_parameters())
    assert any(not torch.equal(p, trained_unet[name]) for name, p in base.unet.named_parameters())
    assert any(not torch.equal(p, trained_text[name]) for name, p in base.text_encoder.named_parameters())
    # No safety checker is saved (the tiny model has none to save, and the folder must not ask for one).
    index = json.loads((result.output / "model_index.json").read_text())
    assert index.get("safety_checker") in (None, [None, None])
    image = generate(pipeline, "a photo of sks dog", num_images=1, num_inference_steps=2, progress=False)[0]
    assert image.size == (64, 64)
    assert load_run_pipeline(result.run_dir).unet.config.sample_size == 8


def test_no_token_reaches_the_run_folder(full_run):
    _, result = full_run
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert "base_model: tiny" in (result.run_dir / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# LoRA: the stock loader reads the file and the image changes.


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_run_loads_in_the_stock_pipeline_and_changes_the_image(tmp_path, kind):
    config = tiny_config(
        tmp_path,
        kind=kind,
        use_lora=True,
        lora_rank=4,
        train_text_encoder=True,
        learning_rate=5e-2,
        with_prior_preservation=False,
        max_steps=4,
    )
    result = train(config)
    assert result.output == result.run_dir / "pytorch_lora_weights.safetensors"
    pipeline = build_pipeline(tiny_components(kind))
    before = generate(pipeline, "a photo of sks dog", num_images=1, num_inference_steps=2, progress=False)[0]
    pipeline.load_lora_weights(result.run_dir)
    after = generate(pipeline, "a photo of sks dog", num_images=1, num_inference_steps=2, progress=False)[0]
    assert images_differ(before, after) > 0.5
    weights = load_file(result.output)
    assert any("text_encoder" in key for key in weights) and any("unet" in key for key in weights)
    kohya = load_file(result.run_dir / "lora_kohya.safetensors")
    prefixes = {key.split("_")[0] + "_" + key.split("_")[1] for key in kohya}
    assert "lora_unet" in prefixes
    assert {"lora_te"} <= prefixes if kind == "sd" else {"lora_te1", "lora_te2"} <= prefixes
    assert all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in kohya)


def test_mixed_precision_keeps_trained_weights_fp32_also_after_resume(tmp_path):
    # bf16 is the low precision a CPU runs; the frozen base is cast, the adapters (masters) must stay fp32.
    config = tiny_config(
        tmp_path,
        use_lora=True,
        train_text_encoder=True,
        mixed_precision="bf16",
        with_prior_preservation=False,
        max_steps=2,
        checkpointing_steps=2,
        validation_steps=2,  # in-loop validation runs under autocast and must not cast the adapters
    )
    train(config)
    checkpoint = load_file(Path(config.output_dir) / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert checkpoint and all("lora" in key for key in checkpoint)  # only the trained weights are checkpointed
    assert {tensor.dtype for tensor in checkpoint.values()} == {torch.float32}
    resumed = train(config.replace(max_steps=3, resume_from="latest"))  # refuses to go on with non-fp32 masters
    assert [row["step"] for row in resumed.losses] == [1, 2, 3]


def test_text_encoder_stops_training_after_its_fraction(tmp_path):
    config = tiny_config(tmp_path, text_encoder_fraction=0.0, with_prior_preservation=False, max_steps=2)
    result = train(config)
    pipeline = load_run_pipeline(result.run_dir)
    base = tiny_components("sd")
    for name, tensor in base.text_encoder.state_dict().items():
        torch.testing.assert_close(pipeline.text_encoder.state_dict()[name], tensor, msg=name)
    assert any(not torch.equal(p, pipeline.unet.state_dict()[n]) for n, p in base.unet.state_dict().items())


def test_optional_features_train(tmp_path):
    # Prodigy, min-SNR weighting, offset noise, gradient checkpointing, no latent cache (VAE in the loop), SDXL with
    # cached prompt embeddings (frozen text encoders).
    config = tiny_config(
        tmp_path,
        kind="sdxl",
        train_text_encoder=False,
        optimizer="prodigy",
        learning_rate=1.0,
        min_snr_gamma=5.0,
        noise_offset=0.1,
        gradient_checkpointing=True,
        cache_latents=False,
        max_steps=2,
    )
    result = train(config)
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["prior_loss"]) for row in result.losses)
    assert (result.output / "text_encoder_2").is_dir()


# --------------------------------------------------------------------------------------------------------------------
# Resume: interrupted after step k and resumed to N == uninterrupted N steps.


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    import dreambooth_lib.train as train_module

    # Linear warm-up and decay, accumulation 2 over 5 images (3 optimiser steps per epoch): step 5 crosses an epoch.
    settings = dict(
        with_prior_preservation=False,
        max_steps=5,
        gradient_accumulation_steps=2,
        lr_scheduler="linear",
        lr_warmup_steps=2,
        checkpointing_steps=2,
        checkpoints_total_limit=None,
        validation_prompts=["a photo of sks dog"],
    )
    straight = train(tiny_config(tmp_path / "straight", **settings))

    class Interrupted(Exception):
        pass

    real_save = train_module.save_checkpoint

    def save_then_crash(accelerator, folder, step, keep):
        path = real_save(accelerator, folder, step, keep)
        if step == 4:
            raise Interrupted
        return path

    interrupted = tiny_config(tmp_path / "resumed", **settings)
    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Interrupted):
        train(interrupted)
    monkeypatch.undo()
    checkpoints = Path(interrupted.output_dir) / "checkpoints"
    (checkpoints / "checkpoint-5.tmp").mkdir()  # a half-written checkpoint from a crash: never picked
    assert latest_checkpoint(checkpoints).name == "checkpoint-4"
    resumed = train(interrupted.replace(resume_from="latest"))

    assert [row["step"] for row in resumed.losses] == [1, 2, 3, 4, 5]
    assert [row["lr"] for row in resumed.losses] == pytest.approx([row["lr"] for row in straight.losses])
    assert resumed.losses[-1]["loss"] == pytest.approx(straight.losses[-1]["loss"], rel=1e-4)
    for module in ("unet", "text_encoder"):
        expected = load_file(straight.output / module / _weights_name(straight.output / module))
        found = load_file(resumed.output / module / _weights_name(resumed.output / module))
        for name, tensor in expected.items():
            torch.testing.assert_close(found[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{module}.{name}")


def _weights_name(folder: Path) -> str:
    return next(path.name for path in folder.glob("*.safetensors"))


def test_latest_ignores_half_written_checkpoints(tmp_path):
    for name in ("checkpoint-3", "checkpoint-12", "checkpoint-20.tmp", "checkpoint-x", "notes"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-12"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("latest", tmp_path / "missing") is None
    with pytest.raises(ValueError, match="checkpoint-<step>"):
        resolve_resume(str(tmp_path / "checkpoint-20.tmp"), tmp_path)


def test_accelerator_takes_each_runs_precision():
    """accelerate refuses a second mixed precision in one process; train() starts afresh through accelerate's private
    reset (see train._new_accelerator), so a notebook can train twice. Fails if accelerate renames or changes it."""
    from accelerate import Accelerator

    from dreambooth_lib.train import _new_accelerator

    assert _new_accelerator(TrainConfig(mixed_precision="no")).mixed_precision == "no"
    with pytest.raises(ValueError, match="already been initialized"):
        Accelerator(mixed_precision="bf16")  # what a second run would meet without the reset
    assert _new_accelerator(TrainConfig(mixed_precision="bf16")).mixed_precision == "bf16"
    assert _new_accelerator(TrainConfig(mixed_precision="no")).mixed_precision == "no"


# --------------------------------------------------------------------------------------------------------------------
# Command line: accelerate launch on two processes, and the demo.


def test_accelerate_launch_on_two_processes_trains_and_saves_once(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "dreambooth_lib", "train", "--preset", "tiny-cpu", "--set",
        f"instance_dir={DOG}", f"output_dir={out}", f"class_dir={tmp_path / 'class'}", "num_class_images=2",
        "max_steps=2", "num_validation_images=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DREAMBOOTH_MODE": "tiny"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("wrote the run folder") == 1, finished.stdout
    rows = (out / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # header + one row per step: the main process alone wrote it
    assert (out / "pipeline" / "model_index.json").is_file()
    assert len(list((tmp_path / "class").glob("*.png"))) == 2


def test_demo_writes_pipeline_samples_and_loss_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a user runs it: a relative output folder, from their own folder
    torch.set_num_threads(2)  # the module's fixture set one; the demo must put back whatever it found
    try:
        assert cli.main(["demo", "--out", "runs/demo", "--steps", "3"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    out = tmp_path / "runs" / "demo"
    for name in ("pipeline/model_index.json", "samples.png", "loss.png", "README.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["with_prior_preservation"] is True
    # The model card's paths work from where the user stands.
    card = (out / "README.md").read_text()
    assert 'from_pretrained("runs/demo/pipeline")' in card and 'load_run_pipeline("runs/demo")' in card
    assert Path("runs/demo/pipeline/model_index.json").is_file()


@pytest.mark.parametrize(
    ("overrides", "fp32_parts"),
    [
        ({"use_lora": True, "train_text_encoder": True}, {"vae"}),
        ({"use_lora": False, "train_text_encoder": False}, {"vae", "unet"}),
        ({"use_lora": False, "train_text_encoder": True}, {"vae", "unet", "text_encoder", "text_encoder_2"}),
    ],
)
def test_frozen_parts_load_in_the_compute_precision_and_trained_ones_in_fp32(overrides, fp32_parts):
    from dreambooth_lib.train import _load_dtypes

    dtypes = _load_dtypes(TrainConfig(**overrides), torch.float16)
    assert dtypes["default"] == torch.float16
    assert {part for part, dtype in dtypes.items() if dtype == torch.float32} == fp32_parts
