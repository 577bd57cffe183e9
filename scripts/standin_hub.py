"""Write a stand-in Hugging Face hub cache: every repository the course loads, under its real id, with random weights.

With `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` pointing at the folder this writes, `from_pretrained(<real id>, ...)`
resolves exactly as it does after a real download, so the notebooks' full-mode branches run offline (the rehearsal,
`.ci/full-rehearsal`). The layout is the one huggingface_hub leaves: `models--owner--name/refs/<ref>` holding a
commit hash and `snapshots/<hash>/<files>` (a real cache keeps blobs and links them; plain files resolve the same).

Two sizes:
- tiny (default): the real classes with small widths, at the real native sizes (SD 1.5 512 px / 64 latents, SDXL
  1024 px / 128 latents), for a CPU, written in seconds;
- full (`--full`): the real architectures (models.full_size_components and the judges' published sizes), for a GPU.

Where each fact comes from (public pages, looked up for this script):
- SD 1.5 file list (fp32 and `fp16` variant safetensors per part; model_index.json with safety_checker and
  feature_extractor entries): https://huggingface.co/pcuenq/stable-diffusion-v1-5/commit/63641623774da2998a288384bd73dffe1a02f004
  ("Duplicate from stable-diffusion-v1-5/stable-diffusion-v1-5"); its text_encoder/config.json records
  `"torch_dtype": "float32"` and the token ids bos 0 / eos 2 / pad 1 (same commit, and models._clip_text_config).
- SDXL base 1.0: unet/ and vae/ hold diffusion_pytorch_model.safetensors and .fp16.safetensors
  (https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/tree/c468d0c3e50feb99266c88ff216754031bb80e4c/unet
  and .../tree/eef8a746a4f8cce8e557ffa34cac849205ba6e4f/vae); its text encoders' config.json record float16 (issue 21
  of this project, which loaded them: transformers 5 then loads them in fp16).
- madebyollin/sdxl-vae-fp16-fix: a standalone VAE repository, config.json and diffusion_pytorch_model.safetensors at
  its top level, no fp16 variant (https://huggingface.co/madebyollin/sdxl-vae-fp16-fix/commits/9292e146692bb47baa25d8d64e86e46b5f524101/...).
- The judges' refs are the ones dreambooth_lib.evaluate pins (DINO_REVISION, CLIP_REVISION): the safetensors bot's
  pull-request branches. DINO ViT-S/16: 224 px, patch 16, width 384, 12 layers, 6 heads; CLIP ViT-B/32: 224 px,
  patch 32 (the published configs, as models in transformers' defaults for CLIPConfig).
- Scheduler configs: SD 1.5 ships a PNDMScheduler, SDXL an EulerDiscreteScheduler, both on the scaled-linear
  0.00085..0.012 schedule with steps_offset 1 (the published scheduler/scheduler_config.json files).

Usage: python scripts/standin_hub.py CACHE_DIR [--full]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, ViTConfig, ViTModel

from dreambooth_lib.evaluate import CLIP_MODEL, CLIP_REVISION, DINO_MODEL, DINO_REVISION
from dreambooth_lib.families import DEFAULT_MODELS, SDXL_FP16_VAE
from dreambooth_lib.models import (
    TOKENIZER_DIR,
    _clip_text_config,
    _full_vae_config,
    _sd15_unet_config,
    _sdxl_unet_config,
    load_tokenizer,
    tiny_clip_text_config,
)

SCALED_LINEAR = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    **SCALED_LINEAR,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **SCALED_LINEAR,
    "clip_sample": False,
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def commit_hash(repo_id: str) -> str:
    """A fixed 40-hex 'commit' per repository, so every write of the cache is identical."""
    return hashlib.sha1(f"standin:{repo_id}".encode()).hexdigest()


def snapshot(cache: Path, repo_id: str, ref: str = "main") -> Path:
    """Create `models--owner--name/refs/<ref>` -> hash and return the (empty, fresh) `snapshots/<hash>` folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit_hash(repo_id))
    folder = repo / "snapshots" / commit_hash(repo_id)
    shutil.rmtree(folder, ignore_errors=True)  # only ever this script's own output
    folder.mkdir(parents=True)
    return folder


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_weights(model: torch.nn.Module, folder: Path, *, fp16_variant: bool, config_dtype: str | None = None) -> None:
    """The fp32 file, and the `fp16` variant file where the real repository has one; optionally record a dtype in
    config.json as the real one does (transformers 5 loads that dtype when the caller names none)."""
    model.to(torch.float32).save_pretrained(folder, safe_serialization=True)
    if fp16_variant:
        model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
        model.to(torch.float32)
    if config_dtype:
        config = json.loads((folder / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = config_dtype
        write_json(folder / "config.json", config)


def save_tokenizer(folder: Path, pad_token: str | None = None) -> None:
    """The real CLIP BPE files (shipped in data/) plus the tokenizer config files a download has."""
    load_tokenizer(TOKENIZER_DIR, pad_token=pad_token).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):  # the real repositories' BPE files (transformers 5 writes tokenizer.json)
        shutil.copyfile(TOKENIZER_DIR / name, folder / name)


def _tiny_unet(sample_size: int, cross_attention_dim: int, sdxl: bool) -> UNet2DConditionModel:
    # Three levels, attention only on the lowest, so 64/128-latent inputs stay cheap on a CPU.
    common = dict(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    if not sdxl:
        return UNet2DConditionModel(**common)
    time_embed_dim = 8
    return UNet2DConditionModel(
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,  # pooled text (32) + 6 size/crop numbers
        **common,
    )


def _vae(resolution: int, scaling_factor: float, full: bool) -> AutoencoderKL:
    if full:
        return AutoencoderKL(**{**_full_vae_config("sd"), "sample_size": resolution, "scaling_factor": scaling_factor})
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        # Self-attention over all 128x128 latents of a 1024 px image costs seconds on a CPU; tiny needs no attention.
        mid_block_add_attention=False,
    )


def write_sd15(cache: Path, full: bool) -> None:
    folder = snapshot(cache, DEFAULT_MODELS["sd"])
    write_json(folder / "model_index.json", SD15_INDEX)
    write_json(folder / "scheduler" / "scheduler_config.json", SD15_SCHEDULER)
    save_tokenizer(folder / "tokenizer")
    text = _clip_text_config(hidden_size=768, layers=12, heads=12, hidden_act="quick_gelu") if full else None
    text = text or _clip_text_config(hidden_size=32, layers=2, heads=4, hidden_act="quick_gelu")
    save_weights(CLIPTextModel(text), folder / "text_encoder", fp16_variant=True, config_dtype="float32")
    unet = UNet2DConditionModel(**_sd15_unet_config()) if full else _tiny_unet(64, 32, sdxl=False)
    save_weights(unet, folder / "unet", fp16_variant=True)
    save_weights(_vae(512, 0.18215, full), folder / "vae", fp16_variant=True)


def write_sdxl(cache: Path, full: bool) -> None:
    folder = snapshot(cache, DEFAULT_MODELS["sdxl"])
    write_json(folder / "model_index.json", SDXL_INDEX)
    write_json(folder / "scheduler" / "scheduler_config.json", SDXL_SCHEDULER)
    save_tokenizer(folder / "tokenizer")
    save_tokenizer(folder / "tokenizer_2", pad_token="!")
    if full:
        vit_l = _clip_text_config(hidden_size=768, layers=12, heads=12, hidden_act="quick_gelu")
        bigg = _clip_text_config(hidden_size=1280, layers=32, heads=20, hidden_act="gelu")
        bigg.projection_dim = 1280
        unet = UNet2DConditionModel(**_sdxl_unet_config())
    else:
        vit_l, bigg = tiny_clip_text_config(32), tiny_clip_text_config(64, projection_dim=32)
        unet = _tiny_unet(128, 32 + 64, sdxl=True)
    save_weights(CLIPTextModel(vit_l), folder / "text_encoder", fp16_variant=True, config_dtype="float16")
    save_weights(
        CLIPTextModelWithProjection(bigg), folder / "text_encoder_2", fp16_variant=True, config_dtype="float16"
    )
    save_weights(unet, folder / "unet", fp16_variant=True)
    save_weights(_vae(1024, 0.13025, full), folder / "vae", fp16_variant=True)


def write_fp16_vae(cache: Path, full: bool) -> None:
    folder = snapshot(cache, SDXL_FP16_VAE)
    vae = _vae(1024, 0.13025, full)
    vae.register_to_config(force_upcast=False)  # the fix's point: it runs in fp16 without NaNs
    save_weights(vae, folder, fp16_variant=False)


def write_judges(cache: Path, full: bool) -> None:
    if full:
        dino_size = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536)
    else:
        dino_size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    dino = ViTModel(ViTConfig(image_size=224, patch_size=16, **dino_size), add_pooling_layer=False)
    save_weights(dino, snapshot(cache, DINO_MODEL, DINO_REVISION), fp16_variant=False)
    if full:
        clip_config = CLIPConfig(vision_config=dict(image_size=224, patch_size=32))
    else:
        vision = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        clip_config = CLIPConfig(
            text_config=tiny_clip_text_config(32).to_dict(),
            vision_config={**vision, "num_attention_heads": 4},
            projection_dim=32,
        )
    folder = snapshot(cache, CLIP_MODEL, CLIP_REVISION)
    save_weights(CLIPModel(clip_config), folder, fp16_variant=False)
    save_tokenizer(folder)


WRITERS: dict[str, Callable[[Path, bool], None]] = {
    DEFAULT_MODELS["sd"]: write_sd15,
    DEFAULT_MODELS["sdxl"]: write_sdxl,
    SDXL_FP16_VAE: write_fp16_vae,
    "judges": write_judges,
}


def write_standin_hub(cache: str | Path, *, full: bool = False, only: list[str] | None = None) -> Path:
    """Write the stand-in repositories (all, or those in `only`: keys of WRITERS) into `cache`; return it."""
    cache = Path(cache)
    torch.manual_seed(0)
    for name, writer in WRITERS.items():
        if only is None or name in only:
            writer(cache, full)
    return cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", help="folder to write (HF_HUB_CACHE for the rehearsal)")
    parser.add_argument("--full", action="store_true", help="the real architectures' sizes (for a GPU; ~25 GB)")
    args = parser.parse_args(argv)
    cache = write_standin_hub(args.cache, full=args.full)
    print(f"stand-in hub cache ({'full-size' if args.full else 'tiny'}): {cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
