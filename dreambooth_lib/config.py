"""TrainConfig: every DreamBooth hyperparameter in one flat dataclass, with its unit, range and a check.

Each field carries `metadata` (help text, unit, and a numeric `range` or a list of `choices`) so forms (widgets.py),
the command line and the validation below all read the same description. Named presets give tested starting points.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import torch

from dreambooth_lib.families import DEFAULT_MODELS, KINDS, SDXL_FP16_VAE


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names the field and what is allowed."""


def _setting(default: Any, help: str, *, unit: str = "", range: tuple | None = None, choices: list | None = None):
    """A dataclass field with the metadata forms and validation read (lists get a fresh copy per instance)."""
    metadata: dict[str, Any] = {"help": help, "unit": unit}
    if range is not None:
        metadata["range"] = range
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


INF = float("inf")
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class TrainConfig:
    """One DreamBooth run. Defaults are SD 1.5 full fine-tuning as in the DreamBooth paper's public recipes."""

    # --- model
    model: str = _setting("tiny", "base model: 'tiny', a hub id or a local diffusers folder")
    kind: str | None = _setting(
        None,
        "model family: None reads it from the model ('tiny': sd); 'sd' or 'sdxl' insists on one",
        choices=list(KINDS),
    )
    vae: str | None = _setting(None, "another VAE to use (hub id or folder), e.g. the fp16-fix VAE for SDXL")
    # --- data
    instance_dir: str = _setting("data/subjects/dog", "folder with 3-5 photos of your subject")
    instance_prompt: str = _setting("a photo of sks dog", "prompt naming the subject with its rare identifier")
    class_dir: str | None = _setting(None, "folder of class images (default: OUTPUT_DIR/class_images)")
    class_prompt: str = _setting("a photo of a dog", "prompt for the subject's class, without the identifier")
    with_prior_preservation: bool = _setting(True, "add the class (prior-preservation) loss of the DreamBooth paper")
    prior_weight: float = _setting(
        1.0, "lambda: weight of the class loss against the instance loss", range=(0.0, 100.0)
    )
    num_class_images: int = _setting(200, "class images wanted (existing ones count)", unit="images", range=(1, 10000))
    class_inference_steps: int = _setting(25, "sampling steps per generated class image", unit="steps", range=(1, 1000))
    class_batch_size: int = _setting(4, "class images generated at once", unit="images", range=(1, 256))
    resolution: int = _setting(512, "training image side (a multiple of 8)", unit="px", range=(8, 4096))
    center_crop: bool = _setting(True, "crop the centre square (else a random square)")
    random_flip: bool = _setting(False, "flip images left-right at random (not for asymmetric subjects)")
    # --- optimisation
    train_batch_size: int = _setting(1, "instance images per step (as many class images are added)", range=(1, 256))
    gradient_accumulation_steps: int = _setting(1, "batches summed per optimiser step", range=(1, 1024))
    max_steps: int = _setting(400, "optimiser steps to train", unit="steps", range=(1, 1_000_000))
    learning_rate: float = _setting(5e-6, "UNet (or UNet LoRA) learning rate", range=(1e-10, 10.0))
    lr_scheduler: str = _setting("constant", "learning-rate schedule after warm-up", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _setting(0, "linear warm-up length", unit="steps", range=(0, 1_000_000))
    optimizer: str = _setting(
        "adamw", "optimiser (Prodigy sets its own step size: use learning_rate 1.0)", choices=["adamw", "prodigy"]
    )
    use_8bit_adam: bool = _setting(False, "AdamW with 8-bit state from bitsandbytes (CUDA only; saves memory)")
    adam_beta1: float = _setting(0.9, "Adam beta1", range=(0.0, 0.999999))
    adam_beta2: float = _setting(0.999, "Adam beta2", range=(0.0, 0.999999))
    adam_epsilon: float = _setting(1e-8, "Adam epsilon", range=(0.0, 1.0))
    weight_decay: float = _setting(1e-2, "decoupled weight decay", range=(0.0, 1.0))
    max_grad_norm: float = _setting(1.0, "gradient clipping norm (0 turns clipping off)", range=(0.0, 1e6))
    noise_offset: float = _setting(
        0.0, "offset noise strength (darker/brighter images; 0.05-0.1 typical)", range=(0.0, 1.0)
    )
    min_snr_gamma: float | None = _setting(
        None, "min-SNR-gamma loss weighting (Hang et al. 2023; 5 is typical)", range=(0.0, 1000.0)
    )
    # --- text encoder
    train_text_encoder: bool = _setting(False, "train the text encoder(s) too (full, or LoRA when use_lora)")
    text_encoder_lr: float | None = _setting(
        None, "text-encoder learning rate (default: learning_rate)", range=(1e-10, 10.0)
    )
    text_encoder_fraction: float = _setting(
        1.0, "stop training the text encoder after this fraction of the steps", range=(0.0, 1.0)
    )
    # --- LoRA
    use_lora: bool = _setting(False, "train LoRA adapters instead of all weights")
    lora_rank: int = _setting(4, "LoRA rank r", range=(1, 1024))
    lora_alpha: float | None = _setting(
        None, "LoRA alpha (scale = alpha / rank; default: the rank)", range=(1e-6, 10000.0)
    )
    use_dora: bool = _setting(False, "weight-decomposed LoRA (DoRA, Liu et al. 2024)")
    # --- memory and speed
    mixed_precision: str = _setting("no", "compute precision (fp16 needs CUDA)", choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = _setting(False, "recompute UNet activations in backward (less memory, slower)")
    attention: str = _setting(
        "sdpa",
        "attention kernel: PyTorch's scaled-dot-product attention, or xformers (CUDA)",
        choices=["sdpa", "xformers"],
    )
    cache_latents: bool = _setting(True, "encode every image once, so the loop never runs the VAE")
    # --- run
    seed: int = _setting(0, "random seed of data order, noise and timesteps", range=(0, 2**32 - 1))
    output_dir: str = _setting("outputs/dreambooth", "run folder: config, loss log, checkpoints, result")
    checkpointing_steps: int = _setting(
        200, "save a resumable checkpoint every N steps and at the last (0: never)", unit="steps", range=(0, 1_000_000)
    )
    checkpoints_total_limit: int | None = _setting(2, "keep at most this many checkpoints (None: all)", range=(1, 1000))
    resume_from: str | None = _setting(None, "'latest' or a checkpoint folder to continue from")
    overwrite: bool = _setting(False, "remove the files of another run in output_dir (only those) and start afresh")
    mirror_dir: str | None = _setting(
        None, "second folder (e.g. on Google Drive) kept with the latest checkpoint and the results; resumes from it"
    )
    max_nonfinite_steps: int = _setting(
        3, "stop when the loss is NaN or infinite for this many steps in a row", unit="steps", range=(1, 1000)
    )
    validation_steps: int = _setting(
        0, "sample the validation prompts every N steps (0: only at the end)", unit="steps", range=(0, 1_000_000)
    )
    validation_prompts: list[str] = _setting(["a photo of sks dog in a bucket"], "prompts sampled for samples.png")
    num_validation_images: int = _setting(2, "images per validation prompt (seeds seed, seed+1, ...)", range=(1, 64))
    validation_inference_steps: int = _setting(25, "sampling steps of validation images", unit="steps", range=(1, 1000))
    guidance_scale: float = _setting(7.5, "classifier-free guidance of validation images", range=(0.0, 50.0))

    # ----------------------------------------------------------------------------------------------------------------

    def validate(self, device: torch.device | str | None = None) -> TrainConfig:
        """Raise ConfigError naming the first bad field and what it allows; returns self when all is well.

        With `device`, also check that the settings run there (precision, xformers, 8-bit Adam). Whether the run fits
        the card's memory is `memory.warn_if_too_big`, which training calls.
        """
        hints = get_type_hints(TrainConfig)
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            _check_type(spec.name, value, hints[spec.name])
            if value is None:
                continue
            if "choices" in spec.metadata and value not in spec.metadata["choices"]:
                raise ConfigError(f"{spec.name}={value!r}: choose one of {spec.metadata['choices']}.")
            if "range" in spec.metadata:
                low, high = spec.metadata["range"]
                if not low <= value <= high:
                    unit = f" {spec.metadata['unit']}" if spec.metadata["unit"] else ""
                    raise ConfigError(f"{spec.name}={value!r} is out of range: allowed {low} to {high}{unit}.")
        if self.resolution % 8:
            raise ConfigError(
                f"resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8), e.g. "
                f"{self.resolution // 8 * 8 or 8}."
            )
        for name in ("instance_prompt", "model", "output_dir", "instance_dir"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} is empty: give a value.")
        if self.with_prior_preservation and not self.class_prompt.strip():
            raise ConfigError("class_prompt is empty but with_prior_preservation is on: name the class, e.g. 'a dog'.")
        if self.lr_warmup_steps > self.max_steps:
            raise ConfigError(f"lr_warmup_steps={self.lr_warmup_steps} exceeds max_steps={self.max_steps}.")
        if self.use_8bit_adam and self.optimizer != "adamw":
            raise ConfigError(f"use_8bit_adam applies to optimizer='adamw', not {self.optimizer!r}: turn one off.")
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "cache_latents=True needs center_crop=True (random crops change every step, so their latents cannot "
                "be computed once): turn one of them off."
            )
        if self.use_dora and not self.use_lora:
            raise ConfigError("use_dora=True needs use_lora=True (DoRA is a kind of LoRA).")
        if self.mirror_dir and Path(self.mirror_dir).absolute() == Path(self.output_dir).absolute():
            raise ConfigError("mirror_dir is output_dir: give another folder for the copy (e.g. on Google Drive).")
        if device is not None:
            self._check_device(torch.device(device))
        return self

    def _check_device(self, device: torch.device) -> None:
        if self.mixed_precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"mixed_precision='fp16' needs a CUDA GPU, but training runs on {device.type}: use 'no' (or 'bf16')."
            )
        if self.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("mixed_precision='bf16' is not supported by this GPU (e.g. a T4): use 'fp16'.")
        if self.attention == "xformers" and (device.type != "cuda" or importlib.util.find_spec("xformers") is None):
            raise ConfigError(
                "attention='xformers' needs a CUDA GPU and the xformers package (pip install xformers): use 'sdpa', "
                "which is as fast on current PyTorch."
            )
        if self.use_8bit_adam and device.type != "cuda":
            raise ConfigError(f"use_8bit_adam=True needs a CUDA GPU (bitsandbytes), not {device.type}: set it False.")

    # ----------------------------------------------------------------------------------------------------------------

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with some fields changed (unknown names raise ConfigError with a suggestion)."""
        for name in overrides:
            _check_name(name)
        return dataclasses.replace(copy.deepcopy(self), **overrides)  # deep: presets' lists stay untouched

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named preset (see PRESETS), with fields overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}.")
        return PRESETS[name].replace(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """Fields from a mapping on top of `base` (default: the defaults); unknown keys raise ConfigError."""
        return (base or cls()).replace(**values)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (or YAML when the name ends in .yaml/.yml)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
        """Read a JSON or YAML file of fields (a subset is fine: the rest come from `base` or the defaults)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist.")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as error:
            raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper()}: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of field names to values.")
        try:
            return cls.from_dict(values, base)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error

    def with_assignments(self, assignments: list[str]) -> TrainConfig:
        """Apply command-line `key=value` strings, each parsed by its field's type (`null` sets an optional to None;
        a list is written `[a, b]`)."""
        values = {}
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"--set {assignment!r}: write it as key=value, e.g. max_steps=200.")
            _check_name(key)
            values[key] = _parse_value(key, raw.strip(), get_type_hints(TrainConfig)[key])
        return self.replace(**values)


def _parse_value(name: str, raw: str, hint: Any) -> Any:
    """Turn the text of `--set name=raw` into the field's type, or raise ConfigError saying what was expected."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and raw.lower() in ("null", "none", ""):
        return None
    expected = next(option for option in options if option is not type(None))
    try:
        if expected == list[str]:
            import yaml

            value = yaml.safe_load(raw) if raw.startswith("[") else [raw]
            return [str(item) for item in value]
        if expected is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        return expected(raw)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{name}={raw!r}: expected a {expected.__name__}.") from error


def _check_name(name: str) -> None:
    names = [spec.name for spec in dataclasses.fields(TrainConfig)]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown setting {name!r}.{hint}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return
        raise ConfigError(f"{name} must not be None.")
    expected = next(option for option in options if option is not type(None))
    if expected == list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{name} must be a list of strings, got {value!r}.")
        return
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return  # 1 is a fine learning rate
    if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
        raise ConfigError(f"{name} must be {expected.__name__}, got {type(value).__name__} {value!r}.")


# The settings that make a run what it is, in reading order: a run's model card lists them, and a training form shows
# them (all but `model` and `vae`, which a notebook picks in code for its mode).
KEY_SETTINGS = (
    "model",
    "vae",
    "instance_prompt",
    "class_prompt",
    "with_prior_preservation",
    "prior_weight",
    "num_class_images",
    "resolution",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "optimizer",
    "use_8bit_adam",
    "train_text_encoder",
    "text_encoder_lr",
    "text_encoder_fraction",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "use_dora",
    "mixed_precision",
    "gradient_checkpointing",
    "noise_offset",
    "min_snr_gamma",
    "checkpointing_steps",
    "validation_prompts",
    "seed",
)

_SD15 = DEFAULT_MODELS["sd"]
_SDXL = DEFAULT_MODELS["sdxl"]

PRESETS: dict[str, TrainConfig] = {
    # Under a minute on a CPU: the tiny random model, 64 px, a handful of class images, a few hundred tiny steps.
    "tiny-cpu": TrainConfig(
        model="tiny",
        resolution=64,
        num_class_images=8,
        class_inference_steps=10,
        train_batch_size=1,
        max_steps=150,
        learning_rate=1e-3,
        train_text_encoder=True,
        checkpointing_steps=100,
        num_validation_images=4,
        validation_inference_steps=10,
        output_dir="outputs/tiny-dreambooth",
    ),
    # SD 1.5 full fine-tune + text encoder + prior preservation at 512 px on a 15 GiB T4: fp16 autocast with fp32
    # master weights, 8-bit Adam and gradient checkpointing keep it inside the card.
    "sd15-full-t4": TrainConfig(
        model=_SD15,
        resolution=512,
        learning_rate=2e-6,
        max_steps=800,
        train_text_encoder=True,
        mixed_precision="fp16",
        use_8bit_adam=True,
        gradient_checkpointing=True,
        checkpointing_steps=200,
        output_dir="outputs/sd15-full",
    ),
    # LoRA needs no memory savers even on a T4, so this one preset is both the T4 and the fast setting.
    "sd15-lora": TrainConfig(
        model=_SD15,
        resolution=512,
        use_lora=True,
        lora_rank=8,
        learning_rate=1e-4,
        max_steps=500,
        train_text_encoder=True,
        text_encoder_lr=5e-5,
        mixed_precision="fp16",
        checkpointing_steps=250,
        output_dir="outputs/sd15-lora",
    ),
    # SDXL LoRA at 1024 px on a 15 GiB T4: the fp16-fix VAE (the stock one overflows in fp16), gradient
    # checkpointing and 8-bit Adam.
    "sdxl-lora-t4": TrainConfig(
        model=_SDXL,
        kind="sdxl",
        vae=SDXL_FP16_VAE,
        resolution=1024,
        use_lora=True,
        lora_rank=4,
        learning_rate=1e-4,
        max_steps=500,
        gradient_accumulation_steps=4,
        with_prior_preservation=False,
        mixed_precision="fp16",
        use_8bit_adam=True,
        gradient_checkpointing=True,
        checkpointing_steps=250,
        guidance_scale=5.0,
        output_dir="outputs/sdxl-lora",
    ),
    # The seed write-up's two commands, flag for flag (tests/test_seed_presets.py reads them from the write-up). SD 1.5:
    # full fine-tune with the text encoder, fp32, no prior preservation, no memory savers (it ran on an A100).
    "seed-sd15": TrainConfig(
        model=_SD15,
        resolution=512,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=5e-6,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_steps=400,
        train_text_encoder=True,
        with_prior_preservation=False,
        mixed_precision="no",
        use_8bit_adam=False,
        gradient_checkpointing=False,
        center_crop=False,  # the script crops at random unless --center_crop is given ...
        cache_latents=False,  # ... so each step encodes its crop, as the script does
        num_class_images=100,
        checkpointing_steps=200,
        output_dir="outputs/seed-sd15",
    ),
    # ... and SDXL LoRA (train_dreambooth_lora_sdxl.py, rank 4 by default) with the fp16-fix VAE, as run on a V100.
    "seed-sdxl-lora": TrainConfig(
        model=_SDXL,
        kind="sdxl",
        vae="madebyollin/sdxl-vae-fp16-fix",
        resolution=1024,
        use_lora=True,
        lora_rank=4,
        train_batch_size=1,
        gradient_accumulation_steps=4,
        learning_rate=1e-4,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        max_steps=500,
        seed=0,
        with_prior_preservation=False,
        mixed_precision="fp16",
        gradient_checkpointing=True,
        use_8bit_adam=True,
        center_crop=False,
        cache_latents=False,
        num_class_images=100,
        weight_decay=1e-4,  # this script's default, not train_dreambooth.py's 1e-2
        text_encoder_lr=5e-6,
        guidance_scale=5.0,
        checkpointing_steps=250,
        output_dir="outputs/seed-sdxl-lora",
    ),
}

# The T4 recipes on a card with memory to spare (A100/H100, 40 GB or more): bf16 (no loss scaling), fused AdamW and no
# recomputation, so every step does the least work.
_NO_MEMORY_SAVERS = dict(mixed_precision="bf16", use_8bit_adam=False, gradient_checkpointing=False)
PRESETS["sd15-full-fast"] = PRESETS["sd15-full-t4"].replace(**_NO_MEMORY_SAVERS)
PRESETS["sdxl-lora-fast"] = PRESETS["sdxl-lora-t4"].replace(**_NO_MEMORY_SAVERS)
