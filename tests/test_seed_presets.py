"""The `seed-*` presets are the seed write-up's two training commands on top of the official scripts' own defaults.

The write-up (../shared/seed/*.txt beside a clean clone) quotes one `accelerate launch` command for diffusers'
train_dreambooth.py (SD 1.5) and one for train_dreambooth_lora_sdxl.py (SDXL LoRA). A flag the command leaves out takes
the script's default, read here from the script's own `add_argument` calls (../shared/reference/diffusers-examples),
never typed by hand. Every TrainConfig field is either compared this way or listed with the reason it is not.
"""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
from official_scripts import FIELD_FLAGS, SCRIPTS_DIR, SHARED, UNUSED, require_shared, script_settings

from dreambooth_lib.config import PRESETS, TrainConfig

SEED_DIR = SHARED / "seed"
PRESET_SCRIPTS = {"seed-sd15": "train_dreambooth.py", "seed-sdxl-lora": "train_dreambooth_lora_sdxl.py"}

# Fields that do not change what is learned, or that the scripts fix in code, with why they are not compared.
NOT_COMPARED = {
    "kind": "which model family: implied by the script (SD or SDXL)",
    "instance_dir": "the user's data",
    "instance_prompt": "the user's data",
    "class_dir": "the user's data",
    "class_prompt": "the user's data",
    "class_inference_steps": "the scripts' pipelines sample class images with their default steps, not a flag",
    "class_batch_size": "speed only (--sample_batch_size)",
    "text_encoder_fraction": "the scripts train the text encoder for the whole run: checked apart (1.0)",
    "use_lora": "implied by the script: checked apart",
    "lora_alpha": "the SDXL script sets alpha = rank, which None means here: checked apart",
    "attention": "the same softmax(QK^T)V whichever kernel (--enable_xformers_memory_efficient_attention)",
    "output_dir": "where results go",
    "checkpointing_steps": "bookkeeping",
    "checkpoints_total_limit": "bookkeeping",
    "resume_from": "bookkeeping",
    "overwrite": "bookkeeping",
    "mirror_dir": "bookkeeping",
    "max_nonfinite_steps": "a safety stop the scripts lack",
    "validation_steps": "sampling to look at, not training",
    "validation_prompts": "sampling to look at, not training",
    "num_validation_images": "sampling to look at, not training",
    "validation_inference_steps": "sampling to look at, not training",
    "guidance_scale": "sampling to look at, not training",
}


def write_up_commands() -> dict[str, list[str]]:
    """Each quoted `accelerate launch` command in the write-up, as {script file name: its argument words}."""
    texts = [path.read_text() for path in sorted(require_shared(SEED_DIR).glob("*.txt"))]
    commands = {}
    for block in re.findall(r"```[^\n]*\n(.*?)```", "\n".join(texts), flags=re.DOTALL):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
        words = shlex.split(" ".join(line.rstrip().removesuffix("\\") for line in lines))
        if "launch" in words:
            script = next(word for word in words if word.endswith(".py"))
            commands[Path(script).name] = words[words.index(script) + 1 :]
    return commands


def expected_settings(script: str, words: list[str]) -> dict[str, object]:
    """TrainConfig's value of every compared field for the script run with `words`."""
    return script_settings(require_shared(SCRIPTS_DIR / script), words)


@pytest.fixture(scope="module")
def commands() -> dict[str, list[str]]:
    found = write_up_commands()
    assert set(found) == set(PRESET_SCRIPTS.values()), f"one command per script expected in {SEED_DIR}: {sorted(found)}"
    return found


def test_every_setting_is_compared_or_excused():
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    assert fields == set(FIELD_FLAGS) | set(NOT_COMPARED), "classify each new TrainConfig field here"
    assert not set(FIELD_FLAGS) & set(NOT_COMPARED)


@pytest.mark.parametrize("preset", sorted(PRESET_SCRIPTS))
def test_seed_preset_equals_the_write_up_command_on_the_scripts_defaults(commands, preset):
    script = PRESET_SCRIPTS[preset]
    expected = expected_settings(script, commands[script])
    if expected["seed"] is None:  # the command leaves the script unseeded: any fixed seed is one of its runs
        expected["seed"] = PRESETS[preset].seed
    expected = {field: value for field, value in expected.items() if value != UNUSED}
    actual = {field: getattr(PRESETS[preset], field) for field in expected}
    assert {k: v for k, v in actual.items() if expected[k] != v} == {}, {k: expected[k] for k in actual}
    # The settings the scripts fix in code.
    config = PRESETS[preset]
    assert config.use_lora == ("lora" in script) and config.text_encoder_fraction == 1.0 and config.lora_alpha is None


def test_the_scripts_defaults_are_read_from_their_argparse(commands):
    """A cross-check of the reader on values a reader sees in the scripts and the write-up."""
    sd15 = expected_settings("train_dreambooth.py", commands["train_dreambooth.py"])
    sdxl = expected_settings("train_dreambooth_lora_sdxl.py", commands["train_dreambooth_lora_sdxl.py"])
    assert (sd15["learning_rate"], sd15["max_steps"], sd15["lr_warmup_steps"]) == (5e-6, 400, 0)
    assert sd15["train_text_encoder"] and not sd15["center_crop"] and sd15["num_class_images"] == 100
    assert (sdxl["weight_decay"], sdxl["text_encoder_lr"], sdxl["lora_rank"]) == (1e-4, 5e-6, 4)
    assert sdxl["use_8bit_adam"] and sdxl["vae"] == "madebyollin/sdxl-vae-fp16-fix" and sdxl["seed"] == 0
