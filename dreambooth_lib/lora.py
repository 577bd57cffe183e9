"""LoRA adapters for DreamBooth: set up with peft, saved for the stock pipelines, exported for kohya/A1111 tools.

LoRA (Hu et al. 2021, eq. 3) keeps a frozen weight W and learns a low-rank update: h = W x + (alpha / r) B A x, with
A (r x in) random and B (out x r) zero at the start, so training begins from the base model exactly. DoRA (Liu et al.
2024, eq. 5) also learns the magnitude of each output row of the updated weight. peft's `LoraConfig` owns both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate.utils import extract_model_from_parallel
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth_lib.files import atomic_output
from dreambooth_lib.models import Components

LORA_WEIGHTS_NAME = LORA_WEIGHT_NAME_SAFE  # diffusers' file name, the one load_lora_weights looks for
# The attention projections of every transformer block: what the DreamBooth LoRA scripts adapt.
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
# Where diffusers' `save_lora_weights` keeps each adapter's LoraConfig in the safetensors header.
METADATA_KEY = "lora_adapter_metadata"
# diffusers' LoRA key endings (UNet: `.lora.down`, text encoders: `.lora_linear_layer.down`) -> kohya's.
_DIFFUSERS_SUFFIXES = {
    ".lora.down.weight": ".lora_down.weight",
    ".lora.up.weight": ".lora_up.weight",
    ".lora_linear_layer.down.weight": ".lora_down.weight",
    ".lora_linear_layer.up.weight": ".lora_up.weight",
}


def _lora_config(rank: int, alpha: float | None, use_dora: bool, target_modules) -> LoraConfig:
    if rank < 1:
        raise ValueError(f"LoRA rank={rank}: use an integer >= 1 (4 to 64 is usual for DreamBooth).")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"LoRA alpha={alpha}: use a positive number, or None for alpha = rank (scale 1).")
    return LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        # Gaussian A and zero B: the adapted model starts identical to the base model.
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
        use_dora=use_dora,
    )


def add_lora(
    components: Components,
    *,
    rank: int = 4,
    alpha: float | None = None,
    train_text_encoder: bool = False,
    use_dora: bool = False,
    target_modules: list[str] | tuple[str, ...] | None = None,
) -> list[torch.nn.Parameter]:
    """Freeze the UNet (and, when `train_text_encoder`, the text encoder(s)) and add trainable LoRA adapters to them.

    Args:
        rank: r, the rank of each low-rank update.
        alpha: the update is scaled by alpha / rank; None means alpha = rank.
        train_text_encoder: also adapt the text encoder(s)' attention projections (q, k, v, out).
        use_dora: learn DoRA's per-row magnitude as well (slower per step, often closer to full fine-tuning).
        target_modules: UNet module names to adapt (default: the attention projections `UNET_TARGET_MODULES`).

    Returns:
        The trainable parameters, in float32 even when the base weights are float16: optimizers and the fp16 gradient
        scaler need fp32 masters ("Attempting to unscale FP16 gradients" otherwise).
    """
    adapted = [components.unet]
    components.unet.requires_grad_(False)
    components.unet.add_adapter(_lora_config(rank, alpha, use_dora, target_modules or UNET_TARGET_MODULES))
    if train_text_encoder:
        for text_encoder in components.text_encoders:
            text_encoder.requires_grad_(False)
            text_encoder.add_adapter(_lora_config(rank, alpha, use_dora, TEXT_ENCODER_TARGET_MODULES))
            adapted.append(text_encoder)
    cast_training_params(adapted, dtype=torch.float32)
    return [p for module in adapted for p in module.parameters() if p.requires_grad]


def _has_adapter(module: torch.nn.Module | None) -> bool:
    return module is not None and bool(getattr(module, "peft_config", None))


def _adapter_layers(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's weights in diffusers' LoRA key format and its LoraConfig as plain data (saved as metadata)."""
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
    return weights, module.peft_config["default"].to_dict()


def save_lora(components: Components, folder: str | os.PathLike) -> Path:
    """Write the adapters of `components` to `folder/pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`.

    Modules wrapped by accelerate (DDP, torch.compile) are unwrapped first. The file's header records each adapter's
    rank and alpha, so pipelines load it with the trained scale.
    """
    unet = extract_model_from_parallel(components.unet)
    if not _has_adapter(unet):
        raise ValueError("the UNet carries no LoRA adapter: call add_lora(components, ...) before save_lora.")
    unet_layers, unet_metadata = _adapter_layers(unet)
    kwargs: dict = {"unet_lora_layers": unet_layers, "unet_lora_adapter_metadata": unet_metadata}
    for name in ("text_encoder", "text_encoder_2"):
        text_encoder = getattr(components, name)
        if text_encoder is None:
            continue
        text_encoder = extract_model_from_parallel(text_encoder)
        if _has_adapter(text_encoder):
            layers, metadata = _adapter_layers(text_encoder)
            kwargs[f"{name}_lora_layers"] = layers
            kwargs[f"{name}_lora_adapter_metadata"] = metadata
    pipeline_class = StableDiffusionXLPipeline if components.kind == "sdxl" else StableDiffusionPipeline
    path = Path(folder) / LORA_WEIGHTS_NAME
    with atomic_output(path) as temporary:  # whole or not at all
        pipeline_class.save_lora_weights(path.parent, weight_name=temporary.name, safe_serialization=True, **kwargs)
    return path


def load_lora(pipeline, path: str | os.PathLike, scale: float = 1.0, adapter_name: str = "dreambooth"):
    """Load a LoRA file (or a folder holding `pytorch_lora_weights.safetensors`) into a stock pipeline.

    `scale` multiplies the update (0: the base model, 1: as trained); both diffusers and kohya-format files load.
    Returns the pipeline.
    """
    path = Path(path)
    folder, weight_name = (path, LORA_WEIGHTS_NAME) if path.is_dir() else (path.parent, path.name)
    if not (folder / weight_name).is_file():
        raise FileNotFoundError(f"LoRA file {folder / weight_name} not found: pass a .safetensors file or its folder.")
    pipeline.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name)
    pipeline.set_adapters(adapter_name, adapter_weights=scale)
    return pipeline


# --------------------------------------------------------------------------------------------------------------------
# kohya / AUTOMATIC1111 format


def _read_lora_file(lora_file: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(lora_file), framework="pt") as handle:
        names = handle.keys()
        weights = {key: handle.get_tensor(key) for key in names}
        header = handle.metadata() or {}
    return weights, json.loads(header.get(METADATA_KEY, "{}"))


def _kohya_prefix(component: str, is_sdxl: bool) -> str:
    # kohya's sd-scripts name SD 1.x's single text encoder `lora_te`, and SDXL's two `lora_te1` and `lora_te2`.
    if component == "unet":
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te1" if is_sdxl else "lora_te"
    return "lora_te2"


def export_kohya(lora_file: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Convert a diffusers LoRA file (from `save_lora`) to the kohya/A1111 format that AUTOMATIC1111, ComfyUI and
    kohya's scripts load: `lora_unet_<module>` / `lora_te_<module>` (SD) or `lora_te1_`/`lora_te2_` (SDXL) keys with
    `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha`.

    Written here rather than with diffusers' `convert_state_dict_to_kohya`, which sets every alpha to the rank (wrong
    scale when alpha != rank) and names SD 1.x's text encoder `lora_te1`.
    """
    lora_file, out_file = Path(lora_file), Path(out_file)
    if lora_file.is_dir():
        lora_file = lora_file / LORA_WEIGHTS_NAME
    if not lora_file.is_file():
        raise FileNotFoundError(f"{lora_file} does not exist: pass a file written by save_lora (or its folder).")
    weights, metadata = _read_lora_file(lora_file)
    if any("lora_magnitude_vector" in key for key in weights):
        raise ValueError(
            f"{lora_file} holds DoRA adapters, whose magnitude vectors the kohya-format tools do not read alike: "
            "use the diffusers file itself (pipe.load_lora_weights) or train without DoRA for a kohya export."
        )
    is_sdxl = any(key.startswith("text_encoder_2.") for key in weights) or "text_encoder_2.r" in metadata
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in _DIFFUSERS_SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{lora_file}: unexpected key {key!r}; export_kohya reads files written by save_lora.")
        module = rest.removesuffix(suffix)
        if component != "unet" and not module.startswith("text_model."):
            # transformers 5 dropped CLIPTextModel's `text_model.` level; kohya names keep it (as transformers 4 did).
            module = f"text_model.{module}"
        name = f"{_kohya_prefix(component, is_sdxl)}_{module.replace('.', '_')}"
        kohya[name + _DIFFUSERS_SUFFIXES[suffix]] = tensor.contiguous()
        if _DIFFUSERS_SUFFIXES[suffix] == ".lora_down.weight":
            # The file's metadata holds the trained alpha; without it diffusers assumes alpha = rank, and so do we.
            alpha = metadata.get(f"{component}.lora_alpha", tensor.shape[0])
            kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    with atomic_output(out_file) as temporary:
        save_file(kohya, str(temporary), metadata={"ss_network_module": "networks.lora"})
    return out_file
