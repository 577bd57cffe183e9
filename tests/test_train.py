"""train(): it learns, it writes outputs the stock tools load, it resumes exactly, and it saves once under accelerate.

Runs are tiny (64 px, a few steps) and shared between tests through module-scoped fixtures.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from tiny_runs import DOG, LORA_SETTINGS, ROOT, Steps, assert_same_run, tiny_config
from transformers import CLIPTextModelWithProjection

from dreambooth_lib import cli, lora, runs
from dreambooth_lib.checkpoints import checkpoint_step, latest_checkpoint, list_checkpoints, resolve_resume
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.denoiser import Denoiser
from dreambooth_lib.generate import generate
from dreambooth_lib.images import DataError
from dreambooth_lib.losses import diffusion_loss
from dreambooth_lib.losslog import read_loss_log
from dreambooth_lib.models import build_pipeline, load_run_pipeline, tiny_components
from dreambooth_lib.runs import RunError
from dreambooth_lib.schedule import NoiseSchedule
from dreambooth_lib.text import encode_prompt
from dreambooth_lib.train import _make_optimizer, train

SECRET = "hf_THIS_TOKEN_MUST_NEVER_BE_WRITTEN_0123456789"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


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
    assert header == "step,loss,instance_loss,prior_loss,lr,skipped"


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
    steps = Steps()
    resumed = train(config.replace(max_steps=3, resume_from="latest"), [steps])  # refuses non-fp32 masters
    assert [row["step"] for row in resumed.losses] == [1, 2, 3]
    assert steps == [3] and resumed.resumed_from.name == "checkpoint-2"


def test_text_encoder_stops_training_after_its_fraction(tmp_path):
    config = tiny_config(tmp_path, text_encoder_fraction=0.0, with_prior_preservation=False, max_steps=2)
    result = train(config)
    pipeline = load_run_pipeline(result.run_dir)
    base = tiny_components("sd")
    for name, tensor in base.text_encoder.state_dict().items():
        torch.testing.assert_close(pipeline.text_encoder.state_dict()[name], tensor, msg=name)
    assert any(not torch.equal(p, pipeline.unet.state_dict()[n]) for n, p in base.unet.state_dict().items())


def test_optional_features_train(tmp_path, monkeypatch):
    # Prodigy, min-SNR weighting, offset noise, gradient checkpointing, no latent cache (VAE in the loop), SDXL with
    # cached prompt embeddings (frozen text encoders): each checked where it acts, not only by a finite loss.
    import dreambooth_lib.train as train_module

    seen = {"noise_offsets": [], "min_snr": [], "encodes": 0, "text_encodes": 0}
    real_noise, real_loss, real_optimizer = train_module.sample_noise, train_module.diffusion_loss, _make_optimizer

    def noise(latents, offset):
        seen["noise_offsets"].append(offset)
        return real_noise(latents, offset)

    def loss(*args, **kwargs):
        seen["min_snr"].append(kwargs["min_snr_gamma"])
        seen["checkpointing"] = seen.get("checkpointing", True) and args[0].unet.is_gradient_checkpointing
        return real_loss(*args, **kwargs)

    def optimizer(*args):
        seen["optimizer"] = real_optimizer(*args)
        return seen["optimizer"]

    monkeypatch.setattr(train_module, "sample_noise", noise)
    monkeypatch.setattr(train_module, "diffusion_loss", loss)
    monkeypatch.setattr(train_module, "_make_optimizer", optimizer)
    steps = Steps()
    encodes = _count_calls(monkeypatch, AutoencoderKL, "encode")
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
        validation_prompts=[],
    )
    text_encodes = _count_calls(monkeypatch, CLIPTextModelWithProjection, "forward")
    result = train(config, [steps, lambda step, row: seen.update({step: (len(encodes), len(text_encodes))})])
    assert all(np.isfinite(row["loss"]) and np.isfinite(row["prior_loss"]) for row in result.losses)
    assert type(seen["optimizer"]).__name__ == "Prodigy"
    assert any("p0" in state for state in seen["optimizer"].state.values())  # Prodigy's own state: it stepped
    assert seen["noise_offsets"] == [0.1, 0.1] and seen["min_snr"] == [5.0, 5.0] and seen["checkpointing"]
    assert seen[2][0] - seen[1][0] == 1  # the VAE encoded the step's batch: no latent cache
    assert seen[2][1] == seen[1][1]  # no text-encoder call per step: the prompts' embeddings were cached
    assert (result.output / "text_encoder_2").is_dir()


def _count_calls(monkeypatch, owner, name) -> list[str]:
    calls, original = [], getattr(owner, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_run_without_validation_prompts_finishes_without_samples(tmp_path):
    # An empty prompt list is a valid choice (no sampling at the end), not a crash after the last step.
    config = tiny_config(tmp_path, validation_prompts=[], with_prior_preservation=False, max_steps=1)
    result = train(config)
    assert result.output.is_dir()
    assert not (result.run_dir / "samples.png").exists()
    card = (result.run_dir / "README.md").read_text()
    assert "no samples were drawn" in card and "samples.png" not in card


# --------------------------------------------------------------------------------------------------------------------
# Resume: interrupted after step k and resumed to N == uninterrupted N steps.


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, capsys):
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

    def save_then_crash(accelerator, folder, step, *args):
        path = real_save(accelerator, folder, step, *args)
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
    capsys.readouterr()
    steps = Steps()
    resumed = train(interrupted.replace(resume_from="latest"), [steps])

    assert steps == [5]  # only the remaining step trained: not a silent restart from step 0
    assert resumed.resumed_from == checkpoints / "checkpoint-4"
    assert f"resumed from checkpoint-4 ({checkpoints / 'checkpoint-4'})" in capsys.readouterr().out
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
    with pytest.raises(RunError, match="checkpoint-<step>"):
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


# --------------------------------------------------------------------------------------------------------------------
# Runs are safe: each fault of issue 14 reproduced on the tiny model, and handled.


def error_lines(captured: str) -> list[str]:
    return [line for line in captured.replace("\r", "\n").splitlines() if line.startswith("error:")]


def test_a_second_subject_into_a_finished_run_folder_is_refused(full_run, tmp_path, capsys):
    config, result = full_run
    run = result.run_dir
    cat = tmp_path / "cat"
    cat.mkdir()
    for index, photo in enumerate(sorted(DOG.iterdir())[:3]):
        (cat / f"cat-{index}.jpg").write_bytes(photo.read_bytes())
    config_before = (run / "config.json").read_bytes()
    unet = run / "pipeline" / "unet" / _weights_name(run / "pipeline" / "unet")
    unet_before = unet.stat().st_mtime_ns
    code = cli.main(
        ["train", "--set", f"instance_dir={cat}", "instance_prompt=a photo of sks cat", f"output_dir={run}",
         f"class_dir={config.class_dir}", "resume_from=latest"]
    )  # fmt: skip
    assert code == 2
    [line] = error_lines(capsys.readouterr().err)
    for expected in (str(run), "instance_prompt", "instance_dir files", "new output_dir", "overwrite=True"):
        assert expected in line, expected
    assert (run / "config.json").read_bytes() == config_before and unet.stat().st_mtime_ns == unet_before
    # The class images were made for "a photo of a dog": a cat run does not reuse them, it says so before any model.
    cat_config = tiny_config(tmp_path, class_dir=config.class_dir, class_prompt="a photo of a cat")
    with pytest.raises(DataError, match=r"a photo of a dog.*another folder"):
        train(cat_config)


def test_nan_loss_stops_the_run_and_saves_nothing_new(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(
        ["train", "--set", f"instance_dir={DOG}", f"output_dir={run}", "learning_rate=10", "max_steps=8",
         "checkpointing_steps=1", "with_prior_preservation=false"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    for expected in ("training stopped at step", "instance_loss=nan", "learning_rate=10.0", "mixed_precision='no'"):
        assert expected in line, expected
    assert not any((run / name).exists() for name in ("pipeline", "samples.png", "README.md", "loss.png"))
    # Checkpoints and the log hold only steps whose loss was still a number.
    rows = read_loss_log(run / "loss.csv")
    assert rows and all(np.isfinite(row["loss"]) for row in rows)
    assert [checkpoint_step(path) for path in list_checkpoints(run / "checkpoints")] == [row["step"] for row in rows]


def test_a_live_run_keeps_a_second_one_out(tmp_path, capsys):
    config = tiny_config(tmp_path)
    with runs.claim(config):  # this process is training into the folder
        code = cli.main(["train", "--set", f"instance_dir={DOG}", f"output_dir={config.output_dir}"])
    assert code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert f"{config.output_dir} is in use by a live run (pid {os.getpid()}" in line


KILLER = """
import os, signal, sys
import dreambooth_lib.train as train_module
from dreambooth_lib.config import TrainConfig

config, where, at = TrainConfig.from_file(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_save = train_module.save_checkpoint

def save_then_die(accelerator, folder, step, *args):
    path = real_save(accelerator, folder, step, *args)
    if where == "after-checkpoint" and step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

def die_between_steps(step, row):
    if where == "between-steps" and step == at:
        os.kill(os.getpid(), signal.SIGKILL)

train_module.save_checkpoint = save_then_die
train_module.train(config, [die_between_steps])
"""


@pytest.fixture(scope="module")
def lora_straight(tmp_path_factory):
    """An uninterrupted LoRA run, mirrored to a second folder (as Colab mirrors to Drive)."""
    tmp_path = tmp_path_factory.mktemp("lora")
    config = tiny_config(tmp_path, **LORA_SETTINGS, mirror_dir=str(tmp_path / "drive"))
    return config, train(config)


def killed_then_resumed(tmp_path: Path, where: str, at: int, tear_loss_log: bool = False):
    config = tiny_config(tmp_path, **LORA_SETTINGS)
    config_file = config.save(tmp_path / "settings.json")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, str(script), str(config_file), where, str(at)], capture_output=True, text=True, env=env
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    log = Path(config.output_dir) / "loss.csv"
    if tear_loss_log:  # an in-place write cut by a crash, with a wrong step 1: resuming must not take it
        lines = log.read_text().splitlines()
        step, loss, *rest = lines[1].split(",")
        log.write_text("\n".join([lines[0], ",".join([step, "9.0", *rest]), *lines[2:]])[:-7])
        assert [row["loss"] for row in read_loss_log(log)] == [9.0]  # what the run folder's log now says
    steps = Steps()
    resumed = train(config.replace(resume_from="latest"), [steps])
    assert steps == [3, 4] and resumed.resumed_from.name == "checkpoint-2"
    return config, resumed


def test_sigkill_right_after_a_checkpoint_then_resume_equals_the_uninterrupted_lora_run(lora_straight, tmp_path):
    _, straight = lora_straight
    _, resumed = killed_then_resumed(tmp_path, "after-checkpoint", 2)
    assert_same_run(resumed, straight)


def test_sigkill_between_steps_and_a_torn_loss_log_then_resume_to_the_end(lora_straight, tmp_path):
    _, straight = lora_straight
    # Killed after step 3 trained, before its checkpoint was due; the run folder's loss.csv then torn.
    _, resumed = killed_then_resumed(tmp_path, "between-steps", 3, tear_loss_log=True)
    assert_same_run(resumed, straight)


def test_pruning_spares_the_new_checkpoint_when_an_older_longer_run_left_later_ones(lora_straight, tmp_path):
    config, straight = lora_straight
    folder = tmp_path / "run"
    shutil.copytree(straight.run_dir, folder)  # checkpoint-2 and checkpoint-4 of a 4-step run
    checkpoints = folder / "checkpoints"
    older = json.loads((checkpoints / "checkpoint-4" / "run.json").read_text())["run_id"]
    shorter = config.replace(
        output_dir=str(folder), mirror_dir=None, max_steps=3, checkpoints_total_limit=1,
        resume_from=str(checkpoints / "checkpoint-2"),
    )  # fmt: skip
    steps = Steps()
    assert train(shorter, [steps]).resumed_from == checkpoints / "checkpoint-2" and steps == [3]
    assert [path.name for path in list_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    current = json.loads((folder / "run.json").read_text())["run_id"]
    assert current != older
    assert latest_checkpoint(checkpoints, current).name == "checkpoint-3"  # not the older run's checkpoint-4


def test_the_mirror_keeps_the_latest_checkpoint_and_results_and_a_new_runtime_resumes_from_it(lora_straight, tmp_path):
    config, straight = lora_straight
    drive = Path(config.mirror_dir)
    assert [path.name for path in list_checkpoints(drive / "checkpoints")] == ["checkpoint-4"]
    for name in ("run.json", "config.json", "loss.csv", "pytorch_lora_weights.safetensors", "README.md"):
        assert (drive / name).is_file(), name
    mirrored, trained = load_file(drive / "pytorch_lora_weights.safetensors"), load_file(straight.output)
    assert mirrored.keys() == trained.keys()
    for name, tensor in trained.items():
        assert torch.equal(mirrored[name], tensor), name
    # A new Colab runtime: empty local disk, the same Drive folder; train two steps further.
    mirror = shutil.copytree(drive, tmp_path / "drive")
    local = str(tmp_path / "local")
    steps = Steps()
    result = train(config.replace(output_dir=local, mirror_dir=str(mirror), max_steps=6, resume_from="latest"), [steps])
    assert steps == [5, 6] and result.resumed_from == mirror / "checkpoints" / "checkpoint-4"
    assert [row["step"] for row in result.losses] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in result.losses[:4]] == pytest.approx([row["loss"] for row in straight.losses])
    assert [path.name for path in list_checkpoints(mirror / "checkpoints")] == ["checkpoint-6"]
