"""The official diffusers scripts as data: their argparse flags read with `ast`, and how TrainConfig names them.

Shared by the seed-preset test (the write-up's commands) and the benchmark test (the command lines it builds).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SCRIPTS_DIR = SHARED / "reference" / "diffusers-examples"

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
UNUSED = "(unused by this script)"
# What a script does for a setting it has no flag for (read from its code, cited by line idea, not by value).
NO_FLAG = {
    "vae": None,  # train_dreambooth.py: the model's own VAE
    "random_flip": False,  # train_dreambooth.py: no flip transform
    "optimizer": "adamw",  # train_dreambooth.py: AdamW (or 8-bit AdamW)
    "text_encoder_lr": None,  # train_dreambooth.py: one parameter group, the UNet's learning rate
    "lora_rank": UNUSED,  # train_dreambooth.py: no LoRA
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


def require_shared(path: Path) -> Path:
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


def command_flags(words: list[str], arguments: dict[str, tuple[object, type]]) -> dict[str, object]:
    """The command's flags as the script parses them: an unambiguous prefix names its flag (`--train_text_encode`)."""
    given = {}
    for word in words:
        flag, has_value, raw = word.partition("=")
        [full] = [name for name in arguments if name == flag] or [name for name in arguments if name.startswith(flag)]
        read = arguments[full][1]
        given[full] = read(raw) if has_value else True
    return given


def script_settings(script: Path, words: list[str]) -> dict[str, object]:
    """What the script trains with when run with `words`: each FIELD_FLAGS field, in TrainConfig's terms (UNUSED:
    a setting the script has no use for, e.g. a LoRA rank in a full fine-tune)."""
    arguments = script_arguments(script)
    values = {flag: default for flag, (default, _) in arguments.items()} | command_flags(words, arguments)
    return {
        field: TRANSLATE.get(flag, lambda value: value)(values[flag]) if flag in arguments else NO_FLAG[field]
        for field, flag in FIELD_FLAGS.items()
    }
