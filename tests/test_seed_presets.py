"""The `seed-*` presets are the seed write-up's two training commands, read flag by flag from the write-up itself.

The write-up (../shared/seed/*.txt beside a clean clone) quotes one `accelerate launch` command for
diffusers' train_dreambooth.py (SD 1.5) and one for train_dreambooth_lora_sdxl.py (SDXL LoRA). A flag the command leaves
out takes the script's default, so the expectations below are the quoted flags on top of those scripts' defaults.
"""

import re
import shlex
from pathlib import Path

import pytest

from dreambooth_lib.config import PRESETS

SEED_DIR = Path(__file__).resolve().parents[2] / "shared" / "seed"

# What each diffusers script does when a flag is left out (their argparse defaults), in TrainConfig's names.
SCRIPT_DEFAULTS = {
    "train_dreambooth.py": {
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 500,
        "with_prior_preservation": False,
        "train_text_encoder": False,
        "mixed_precision": "no",  # accelerate's default without a config file
        "use_8bit_adam": False,
        "gradient_checkpointing": False,
        "use_lora": False,
    },
    "train_dreambooth_lora_sdxl.py": {
        "train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 500,
        "with_prior_preservation": False,
        "train_text_encoder": False,
        "mixed_precision": "no",
        "use_8bit_adam": False,
        "gradient_checkpointing": False,
        "use_lora": True,  # the script trains LoRA adapters only
        "lora_rank": 4,
    },
}

# Flag -> (TrainConfig field, how to read the value). argparse accepts any unambiguous prefix, so the write-up's
# `--train_text_encode` is `--train_text_encoder`.
FLAGS = {
    "--pretrained_model_name_or_path": ("model", str),
    "--pretrained_vae_model_name_or_path": ("vae", str),
    "--resolution": ("resolution", int),
    "--train_batch_size": ("train_batch_size", int),
    "--gradient_accumulation_steps": ("gradient_accumulation_steps", int),
    "--learning_rate": ("learning_rate", float),
    "--lr_scheduler": ("lr_scheduler", str),
    "--lr_warmup_steps": ("lr_warmup_steps", int),
    "--max_train_steps": ("max_steps", int),
    "--seed": ("seed", int),
    "--mixed_precision": ("mixed_precision", str),
    "--train_text_encode": ("train_text_encoder", bool),
    "--train_text_encoder": ("train_text_encoder", bool),
    "--with_prior_preservation": ("with_prior_preservation", bool),
    "--gradient_checkpointing": ("gradient_checkpointing", bool),
    "--use_8bit_adam": ("use_8bit_adam", bool),
}
# Flags that name the user's data and output, or choose an attention kernel with the same maths (xformers; PyTorch's
# scaled-dot-product attention computes the same softmax(QK^T)V and needs no extra package on Colab).
NOT_RECIPE = {
    "--instance_data_dir",
    "--output_dir",
    "--instance_prompt",
    "--enable_xformers_memory_efficient_attention",
}
# The SD 1.5 weights moved on the hub; the old id in the write-up is gone.
RENAMED_MODELS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def _write_up_commands() -> dict[str, list[str]]:
    """Each quoted `accelerate launch` command in the write-up, as {script file name: its argument words}."""
    texts = [path.read_text() for path in sorted(SEED_DIR.glob("*.txt"))]
    commands = {}
    for block in re.findall(r"```[^\n]*\n(.*?)```", "\n".join(texts), flags=re.DOTALL):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
        words = shlex.split(" ".join(line.rstrip().removesuffix("\\") for line in lines))
        if "launch" in words:
            script = next(word for word in words if word.endswith(".py"))
            commands[Path(script).name] = words[words.index(script) + 1 :]
    return commands


def _expected_settings(script: str, words: list[str]) -> dict:
    expected = dict(SCRIPT_DEFAULTS[script])
    for word in words:
        flag, has_value, raw = word.partition("=")
        if flag in NOT_RECIPE:
            continue
        assert flag in FLAGS, f"the write-up's {script} command uses {flag}, which this test does not translate"
        name, read = FLAGS[flag]
        expected[name] = True if read is bool and not has_value else read(raw)
    expected["model"] = RENAMED_MODELS.get(expected["model"], expected["model"])
    return expected


@pytest.fixture(scope="module")
def commands() -> dict[str, list[str]]:
    if not SEED_DIR.is_dir():
        pytest.skip(f"the seed write-up is not beside this clone ({SEED_DIR} is absent): nothing to compare with")
    found = _write_up_commands()
    assert set(found) == set(SCRIPT_DEFAULTS), f"expected one command per script in {SEED_DIR}, found {sorted(found)}"
    return found


@pytest.mark.parametrize(
    ("preset", "script"), [("seed-sd15", "train_dreambooth.py"), ("seed-sdxl-lora", "train_dreambooth_lora_sdxl.py")]
)
def test_seed_preset_equals_the_write_up_command(commands, preset, script):
    expected = _expected_settings(script, commands[script])
    actual = {name: getattr(PRESETS[preset], name) for name in expected}
    assert actual == expected


def test_the_write_up_commands_are_the_recipes_the_issue_names(commands):
    """A cross-check of the parser on the numbers a reader sees in the write-up."""
    sd15 = _expected_settings("train_dreambooth.py", commands["train_dreambooth.py"])
    sdxl = _expected_settings("train_dreambooth_lora_sdxl.py", commands["train_dreambooth_lora_sdxl.py"])
    assert (sd15["learning_rate"], sd15["max_steps"], sd15["lr_warmup_steps"]) == (5e-6, 400, 0)
    assert (sd15["train_batch_size"], sd15["gradient_accumulation_steps"], sd15["resolution"]) == (1, 1, 512)
    assert sd15["train_text_encoder"] and not sd15["with_prior_preservation"] and sd15["mixed_precision"] == "no"
    assert (sdxl["learning_rate"], sdxl["max_steps"], sdxl["gradient_accumulation_steps"]) == (1e-4, 500, 4)
    assert (sdxl["train_batch_size"], sdxl["resolution"], sdxl["seed"], sdxl["mixed_precision"]) == (1, 1024, 0, "fp16")
    assert sdxl["use_8bit_adam"] and sdxl["gradient_checkpointing"] and sdxl["vae"] == "madebyollin/sdxl-vae-fp16-fix"
