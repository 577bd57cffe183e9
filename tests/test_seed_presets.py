"""The `seed-*` presets are the seed write-up's two training commands on top of the official scripts' own defaults.

The write-up (../shared/seed/*.txt beside a clean clone) quotes one `accelerate launch` command for diffusers'
train_dreambooth.py (SD 1.5) and one for train_dreambooth_lora_sdxl.py (SDXL LoRA). A flag the command leaves out takes
the script's default, read here from the script's own `add_argument` calls (../shared/reference/diffusers-examples),
never typed by hand. Every TrainConfig field is either compared this way or listed with the reason it is not.
"""

import ast
import dataclasses
import os
import re
import shlex
from pathlib import Path

import pytest

from dreambooth_lib.config import PRESETS, TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED_DIR = SHARED / "seed"
SCRIPTS_DIR = SHARED / "reference" / "diffusers-examples"
PRESET_SCRIPTS = {"seed-sd15": "train_dreambooth.py", "seed-sdxl-lora": "train_dreambooth_lora_sdxl.py"}

# TrainConfig field -> the scripts' flag (both scripts name a setting alike where both have it).
FIELD_FLAGS = {
    "model": "--pretrained_model_name_or_path",
    "vae": "--pretrained_vae_model_name_or_path",
    "with_prior_preservation": "--with_prior_preservation",
    "prior_weight": "--prior_loss_weight",
    "num_class_images": "--num_class_images",
    "resolution": "--resolution",
    "center_crop": "--center_crop",
    "random_flip": "--random_flip",
    "cache_latents": "--cache_latents",
    "train_batch_size": "--train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps",
    "max_steps": "--max_train_steps",
    "learning_rate": "--learning_rate",
    "lr_scheduler": "--lr_scheduler",
    "lr_warmup_steps": "--lr_warmup_steps",
    "optimizer": "--optimizer",
    "use_8bit_adam": "--use_8bit_adam",
    "adam_beta1": "--adam_beta1",
    "adam_beta2": "--adam_beta2",
    "adam_epsilon": "--adam_epsilon",
    "weight_decay": "--adam_weight_decay",
    "max_grad_norm": "--max_grad_norm",
    "noise_offset": "--offset_noise",
    "min_snr_gamma": "--snr_gamma",
    "train_text_encoder": "--train_text_encoder",
    "text_encoder_lr": "--text_encoder_lr",
    "lora_rank": "--rank",
    "use_dora": "--use_dora",
    "mixed_precision": "--mixed_precision",
    "gradient_checkpointing": "--gradient_checkpointing",
    "seed": "--seed",
}
# What a script does for a setting it has no flag for (read from its code, cited by line idea, not by value).
NO_FLAG = {
    "vae": None,  # train_dreambooth.py: the model's own VAE
    "random_flip": False,  # train_dreambooth.py: no flip transform
    "optimizer": "adamw",  # train_dreambooth.py: AdamW (or 8-bit AdamW)
    "text_encoder_lr": None,  # train_dreambooth.py: one parameter group, the UNet's learning rate
    "lora_rank": PRESETS["seed-sd15"].lora_rank,  # train_dreambooth.py: no LoRA, the rank is unused
    "use_dora": False,
    "noise_offset": 0.0,  # train_dreambooth_lora_sdxl.py: no offset noise
    "cache_latents": False,  # neither script: the VAE encodes each step's crop
}
# Script value -> TrainConfig value, where the two spell one setting differently.
TRANSLATE = {
    "--mixed_precision": lambda value: value or "no",  # accelerate's default without a config file
    "--offset_noise": lambda on: 0.1 if on else 0.0,  # train_dreambooth.py adds 0.1 * per-channel noise when on
    "--optimizer": str.lower,
    "--pretrained_model_name_or_path": lambda name: RENAMED_MODELS.get(name, name),
}
# The SD 1.5 weights moved on the hub; the old id in the write-up is gone.
RENAMED_MODELS = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
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


def _require(path: Path) -> Path:
    """The shared folder beside the clone; in CI (env CI set) its absence is a failure, elsewhere a skip."""
    if not path.exists():
        message = f"{path} is absent (the seed write-up and the official scripts live beside a clean clone)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def script_arguments(script: Path) -> dict[str, tuple[object, type]]:
    """Each `--flag` of the script's argparse: (its default, the type its value is read as).

    A `store_true` flag without a default is False when absent, True when given."""
    arguments = {}
    for node in ast.walk(ast.parse(script.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        default = ast.literal_eval(keywords["default"]) if "default" in keywords else None
        if "action" in keywords and ast.literal_eval(keywords["action"]) == "store_true":
            arguments[node.args[0].value] = (bool(default), bool)
        else:
            read = {"int": int, "float": float}.get(getattr(keywords.get("type"), "id", "str"), str)
            arguments[node.args[0].value] = (default, read)
    return arguments


def write_up_commands() -> dict[str, list[str]]:
    """Each quoted `accelerate launch` command in the write-up, as {script file name: its argument words}."""
    texts = [path.read_text() for path in sorted(_require(SEED_DIR).glob("*.txt"))]
    commands = {}
    for block in re.findall(r"```[^\n]*\n(.*?)```", "\n".join(texts), flags=re.DOTALL):
        lines = [line for line in block.splitlines() if not line.lstrip().startswith("#")]
        words = shlex.split(" ".join(line.rstrip().removesuffix("\\") for line in lines))
        if "launch" in words:
            script = next(word for word in words if word.endswith(".py"))
            commands[Path(script).name] = words[words.index(script) + 1 :]
    return commands


def command_flags(words: list[str], arguments: dict[str, tuple[object, type]]) -> dict[str, object]:
    """The command's flags as the script parses them: an unambiguous prefix names its flag (`--train_text_encode`)."""
    given = {}
    for word in words:
        flag, has_value, raw = word.partition("=")
        [full] = [name for name in arguments if name == flag] or [name for name in arguments if name.startswith(flag)]
        read = arguments[full][1]
        given[full] = read(raw) if has_value else True
    return given


def expected_settings(script: str, words: list[str]) -> dict[str, object]:
    """TrainConfig's value of every compared field for the script run with `words`."""
    arguments = script_arguments(_require(SCRIPTS_DIR / script))
    values = {flag: default for flag, (default, _) in arguments.items()} | command_flags(words, arguments)
    expected = {}
    for field, flag in FIELD_FLAGS.items():
        if flag in arguments:
            expected[field] = TRANSLATE.get(flag, lambda value: value)(values[flag])
        else:
            expected[field] = NO_FLAG[field]
    return expected


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
