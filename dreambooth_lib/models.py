"""Stable Diffusion components: full-size from a hub id or a local folder, or tiny and random, built in code.

Both paths give the same `Components` bundle of the same diffusers/transformers classes, so everything downstream
(training, sampling, the notebooks) runs one code path whatever the size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from huggingface_hub import try_to_load_from_cache
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedModel

from dreambooth_lib.assets import data_dir
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.families import DEFAULT_MODELS, KINDS, NATIVE_RESOLUTION, SDXL_FP16_VAE, TINY, Kind

TOKENIZER_DIR = data_dir() / "clip-tokenizer"


class ModelSourceError(RuntimeError):
    """A model id or folder could not be loaded; the message says why and what to do instead."""


@dataclass
class Components:
    """Everything DreamBooth touches in a Stable Diffusion model.

    SD 1.x/2.x has one tokenizer and text encoder; SDXL adds a second pair (`tokenizer_2`, `text_encoder_2`, whose
    pooled, projected output conditions the UNet together with the image size and crop).
    """

    kind: Kind
    source: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def is_tiny(self) -> bool:
        return self.source == TINY

    @property
    def resolution(self) -> int:
        """The image size this model was trained at (and samples best at)."""
        return NATIVE_RESOLUTION[TINY if self.is_tiny else self.kind]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for every Stable Diffusion VAE, and for the tiny one)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Components:
        """Move every module to `device` (and `dtype`, when given); returns self for chaining."""
        for module in (self.vae, self.unet, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        return self

    def park_frozen(self, *, vae: bool, text_encoders: bool) -> list[torch.nn.Module]:
        """Move the VAE and/or the text encoders to CPU memory, for a training loop that never runs them.

        Once latents and prompt embeddings are cached, a frozen VAE and text encoders only hold GPU memory (SDXL in
        fp16: 1.5 GiB of text encoders, 0.16 GiB of VAE), which a 15 GiB card needs for the UNet's activations.
        Returns the parked modules; `on_device` brings them back for sampling.
        """
        parked = ([self.vae] if vae else []) + (self.text_encoders if text_encoders else [])
        was_on_gpu = any(module.device.type == "cuda" for module in parked)
        for module in parked:
            module.to("cpu")
        if was_on_gpu:
            torch.cuda.empty_cache()  # hand the freed blocks back, so the card's reserved memory shrinks too
        return parked

    @contextmanager
    def on_device(self, device: torch.device | str) -> Iterator[None]:
        """Within the block, modules parked in CPU memory (`park_frozen`) are on `device` (to sample); then back."""
        device = torch.device(device)
        frozen = (self.vae, *self.text_encoders)
        away = [module for module in frozen if module.device.type == "cpu"] if device.type != "cpu" else []
        for module in away:
            module.to(device)
        try:
            yield
        finally:
            for module in away:
                module.to("cpu")


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(folder: str | os.PathLike = TOKENIZER_DIR, *, pad_token: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from a folder holding `vocab.json` and `merges.txt` (by default the one shipped in `data/`).

    SDXL's second tokenizer is the same vocabulary padded with "!" instead of the end-of-text token.
    """
    folder = Path(folder)
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {folder} lacks {', '.join(missing)}: point to a folder with the CLIP BPE files "
            f"(the package ships them in data/clip-tokenizer)."
        )
    kwargs = {"pad_token": pad_token} if pad_token else {}
    # transformers 5 ignores vocab_file=/merges_file= in the constructor; from_pretrained reads the folder correctly.
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Tiny components: real classes, small configs, fixed seeds.


def tiny_clip_text_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    """A two-layer CLIP text encoder's config on the real vocabulary: the tiny models' (and tiny backbones') one."""
    return CLIPTextConfig(
        vocab_size=49408,  # the real vocabulary, so the real tokenizer's ids are valid
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # SDXL reads the penultimate layer: keep at least two
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=projection_dim or hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_text_encoder(hidden_size: int, *, projection_dim: int | None, seed: int) -> CLIPTextModel:
    config = tiny_clip_text_config(hidden_size, projection_dim)
    torch.manual_seed(seed)
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_class(config).eval()


def _tiny_vae(kind: Kind, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    # Four blocks, like the real VAE, so a 64 px image becomes 8x8x4 latents (the same 48x compression).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_RESOLUTION[TINY],
        scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    ).eval()


def _tiny_unet(kind: Kind, cross_attention_dim: int, pooled_dim: int | None, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    common = dict(
        sample_size=NATIVE_RESOLUTION[TINY] // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )
    if kind == "sd":
        return UNet2DConditionModel(attention_head_dim=8, **common).eval()
    # SDXL: linear attention projections and "text_time" added conditioning (pooled text + 6 size/crop numbers).
    time_embed_dim = 8
    return UNet2DConditionModel(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        transformer_layers_per_block=(1, 2),
        **common,
    ).eval()


def sd15_noise_scheduler() -> DDPMScheduler:
    """The training schedule of SD 1.x and SDXL: scaled-linear betas from 0.00085 to 0.012 over 1000 steps."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def tiny_components(kind: Kind = "sd", seed: int = 0) -> Components:
    """Tiny, randomly initialised components of the real classes, identical for the same `kind` and `seed`."""
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"kind={kind!r}: use 'sd' (SD 1.x/2.x) or 'sdxl'.")
    tokenizer = load_tokenizer()
    text_encoder = _tiny_text_encoder(32, projection_dim=None, seed=seed)
    tokenizer_2 = text_encoder_2 = None
    cross_attention_dim, pooled_dim = 32, None
    if kind == "sdxl":
        tokenizer_2 = load_tokenizer(pad_token="!")
        text_encoder_2 = _tiny_text_encoder(64, projection_dim=32, seed=seed + 1)
        # SDXL concatenates both encoders' penultimate hidden states along the feature axis.
        cross_attention_dim, pooled_dim = 32 + 64, 32
    return Components(
        kind=kind,
        source=TINY,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_tiny_vae(kind, seed + 2),
        unet=_tiny_unet(kind, cross_attention_dim, pooled_dim, seed + 3),
        noise_scheduler=sd15_noise_scheduler(),
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
    )


# --------------------------------------------------------------------------------------------------------------------
# Full-size architectures with random weights: the published configs of SD 1.5 and SDXL base 1.0, written out here so
# benchmarks can build (and count, on the "meta" device) the real models without a download.


def _sd15_unet_config() -> dict:
    """stable-diffusion-v1-5's unet/config.json."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _sdxl_unet_config() -> dict:
    """stable-diffusion-xl-base-1.0's unet/config.json: three levels, 1/2/10 transformer layers, micro-conditioning."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 size/crop numbers x 256
        norm_num_groups=32,
    )


def _full_vae_config(kind: Kind) -> dict:
    """The SD VAE (SDXL's has the same shape, retrained, with another latent scale)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=NATIVE_RESOLUTION[kind],
        scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    )


def _clip_text_config(*, hidden_size: int, layers: int, heads: int, hidden_act: str) -> CLIPTextConfig:
    """A CLIP text transformer as the pipelines' text_encoder*/config.json describe it (token ids as published)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Create parameters in `dtype` from the start (SDXL in fp32 and then cast would need twice the memory)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def full_size_components(
    kind: Kind = "sd", *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> Components:
    """The real SD 1.5 or SDXL base 1.0 architecture with random weights, built directly on `device`.

    For measuring, not sampling: the weights are PyTorch's default initialisation. On the "meta" device the modules
    hold no memory (for counting parameters); on "cuda" they are built in seconds. The bundle saves with
    `save_components` and loads back with `load_components` like a downloaded model.

    Args:
        kind: "sd" (SD 1.5: CLIP ViT-L/14 text encoder) or "sdxl" (adds OpenCLIP ViT-bigG/14 with projection).
        device: where the parameters are created.
        dtype: their dtype (default: torch's default, float32).
        seed: seed of the random initialisation.
    """
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"kind={kind!r}: use 'sd' (SD 1.x/2.x) or 'sdxl'.")
    torch.manual_seed(seed)
    vit_l = _clip_text_config(hidden_size=768, layers=12, heads=12, hidden_act="quick_gelu")
    with torch.device(device), _default_dtype(dtype):
        text_encoder = CLIPTextModel(vit_l)
        vae = AutoencoderKL(**_full_vae_config(kind))
        tokenizer_2 = text_encoder_2 = None
        if kind == "sdxl":
            bigg = _clip_text_config(hidden_size=1280, layers=32, heads=20, hidden_act="gelu")
            text_encoder_2 = CLIPTextModelWithProjection(bigg)
            tokenizer_2 = load_tokenizer(pad_token="!")
            unet = UNet2DConditionModel(**_sdxl_unet_config())
        else:
            unet = UNet2DConditionModel(**_sd15_unet_config())
    for module in (text_encoder, vae, unet, text_encoder_2):
        if module is not None:
            module.eval()
    return Components(
        kind=kind,
        source=f"random {kind} architecture",
        tokenizer=load_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=sd15_noise_scheduler(),
        tokenizer_2=tokenizer_2,
        text_encoder_2=text_encoder_2,
    )


# --------------------------------------------------------------------------------------------------------------------
# Full components: a hub id or a local diffusers folder, safetensors only.


def _looks_like_path(source: str) -> bool:
    """A hub id is `owner/name`; anything with more parts, a leading ./ / ~, or that exists on disk is a folder."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source or Path(source).exists()


def _source_error(source: str, cause: BaseException) -> ModelSourceError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE is set, so the hub is not contacted" if offline else f"{type(cause).__name__}: {cause}"
    return ModelSourceError(
        f"Could not load the model {source!r} ({why}).\n"
        "Ways out:\n"
        "  - a local diffusers folder: pass its path (download it once where you have internet, e.g. with "
        "`huggingface-cli download ID --local-dir FOLDER`);\n"
        "  - a mirror or renamed id on the hub (the old 'runwayml/stable-diffusion-v1-5' is gone: use "
        f"'{DEFAULT_MODELS['sd']}');\n"
        "  - a gated model: accept its licence on the hub and log in (`huggingface-cli login`);\n"
        "  - tiny mode, which needs no download: set DREAMBOOTH_MODE=tiny or pass 'tiny'."
    )


def _read_model_index(source: str, revision: str | None) -> dict:
    """The pipeline's model_index.json: tells SD from SDXL, and is the first (cheapest) file to fail when offline."""
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        index = folder / "model_index.json"
        if (folder / "pipeline" / "model_index.json").is_file():
            raise ModelSourceError(
                f"{folder} is a training run folder: pass the pipeline inside it, {folder / 'pipeline'}"
            )
        if (folder / LORA_WEIGHT_NAME_SAFE).is_file():
            raise ModelSourceError(
                f"{folder} holds a LoRA, not a whole model: pass the base model it was trained on as the model and "
                "this folder as the LoRA (`--lora`, or `load_run_pipeline`)"
            )
        if not index.is_file():
            raise ModelSourceError(
                f"{folder} is not a diffusers pipeline folder (no model_index.json there). Save one with "
                "`pipeline.save_pretrained(folder)` or `save_components`, or pass a hub id."
            )
        return json.loads(index.read_text())
    try:
        return DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # hub errors come as OSError, HTTP errors, validation errors...
        raise _source_error(source, error) from error


def detect_kind(model_index: dict) -> Kind:
    """SDXL pipelines carry a second text encoder; everything else here is SD 1.x/2.x-shaped."""
    return "sdxl" if model_index.get("text_encoder_2") or "XL" in model_index.get("_class_name", "") else "sd"


def resolve_kind(source: str, kind: Kind | None = None, revision: str | None = None) -> Kind:
    """The family of model `source`: `kind` when given; otherwise "sd" for the tiny model, the known family of a default
    hub id, or what the model's model_index.json says. The loader and the memory estimate both decide with this."""
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: use 'sd' (SD 1.x/2.x), 'sdxl', or None to read it from the model.")
        return kind
    if source == TINY:
        return "sd"
    known = {model: family for family, model in DEFAULT_MODELS.items()}
    return known.get(source) or detect_kind(_read_model_index(source, revision))


# The pipeline folder's subfolder for each part, and the class that loads it.
PARTS: dict[str, tuple[str, type]] = {
    "tokenizer": ("tokenizer", CLIPTokenizer),
    "tokenizer_2": ("tokenizer_2", CLIPTokenizer),
    "text_encoder": ("text_encoder", CLIPTextModel),
    "text_encoder_2": ("text_encoder_2", CLIPTextModelWithProjection),
    "vae": ("vae", AutoencoderKL),
    "unet": ("unet", UNet2DConditionModel),
    "noise_scheduler": ("scheduler", DDPMScheduler),
}
_HALF = (torch.float16, torch.bfloat16)


def load_part(
    source: str,
    part: str,
    *,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
):
    """Load one part of a diffusers pipeline (see PARTS) from a hub id or folder, downloading only that part.

    Weights loaded in fp16/bf16 come from the folder's `fp16` variant files when it has them (half the download and
    half the memory while loading: SDXL in fp32 would need ~14 GB of RAM, more than a Colab runtime has); weights
    loaded in fp32 come from the full-precision files, so parts that train start from the original numbers.
    `subfolder=""` loads a standalone model folder or repository (e.g. the fp16-fix VAE). Weights load in
    `torch_dtype`, float32 when none is given, whatever dtype the part's config.json records. A part whose weights
    are missing raises a one-line ModelSourceError naming the repository and the files looked for.
    """
    folder, model_class = PARTS[part]
    folder = folder if subfolder is None else subfolder or None
    path = str(Path(source).expanduser()) if _looks_like_path(source) else source

    def load(**weights):
        return model_class.from_pretrained(path, subfolder=folder, revision=revision, **weights)

    # Always an explicit dtype: given none, transformers 5 loads the dtype a config.json records, and SDXL's text
    # encoders record float16, which a CPU then multiplies with float32 inputs ("c10::Half != float").
    torch_dtype = torch_dtype or torch.float32
    variants = ["fp16", None] if variant is None and torch_dtype in _HALF else [variant]
    try:
        if model_class in (CLIPTokenizer, DDPMScheduler):
            return load()
        if len(variants) == 2:
            try:
                return load(use_safetensors=True, torch_dtype=torch_dtype, variant="fp16")
            except OSError:
                pass  # this folder has no fp16 files: read the full-precision ones and cast them
        return load(use_safetensors=True, torch_dtype=torch_dtype, variant=variant)
    except Exception as error:
        looked_for = [_weights_file(model_class, folder, each) for each in variants]
        if _has_file(path, _in(folder, "config.json"), revision) and not any(
            _has_file(path, name, revision) for name in looked_for
        ):
            raise ModelSourceError(
                f"{source} has no weights for its {folder or 'model'}: looked for {' and '.join(looked_for)} "
                "(safetensors only); download them (`huggingface-cli download ID`) or pass a folder that has them."
            ) from error
        raise _source_error(_in(folder, source) if folder else source, error) from error


def _in(folder: str | None, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _weights_file(model_class: type, folder: str | None, variant: str | None) -> str:
    """The safetensors file `from_pretrained` reads: transformers' `model`, diffusers' `diffusion_pytorch_model`."""
    stem = "model" if issubclass(model_class, PreTrainedModel) else "diffusion_pytorch_model"
    return _in(folder, f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors")


def _has_file(path: str, name: str, revision: str | None) -> bool:
    """Whether a local folder, or the hub cache's copy of a repository, holds `name` (no network)."""
    if _looks_like_path(path):
        return (Path(path) / name).is_file()
    return isinstance(try_to_load_from_cache(path, name, revision=revision), str)


def load_components(
    source: str | os.PathLike = TINY,
    *,
    kind: Kind | None = None,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    seed: int = 0,
) -> Components:
    """Load the components of a Stable Diffusion model.

    Args:
        source: `"tiny"`, a hub id, or a local diffusers pipeline folder.
        kind: `"sd"` or `"sdxl"` to insist on a family (a model of the other family is refused); None reads it from
            the model (`resolve_kind`; the tiny model is then "sd").
        vae: another VAE (hub id or folder) to use instead of the model's own. SDXL from the default hub id uses the
            fp16-fix VAE unless told otherwise.
        revision, variant: passed to `from_pretrained`. Without a variant, parts loaded in fp16/bf16 read the
            model's `fp16` files where it has them (see `load_part`).
        torch_dtype: dtype of the loaded weights, or one per part as a mapping such as
            `{"unet": torch.float32, "default": torch.float16}` (a trained part in fp32, the frozen ones in fp16).
            Tiny components are always built in float32.
        seed: seed of the tiny components.
    """
    source = os.fspath(source)  # a pathlib.Path to a pipeline folder works like its string
    if source == TINY:
        components = tiny_components(resolve_kind(source, kind), seed=seed)
        # Built in fp32; a per-part mapping is applied later, where the parts are placed for training.
        return components.to("cpu", torch_dtype) if isinstance(torch_dtype, torch.dtype) else components
    found = detect_kind(_read_model_index(source, revision))
    if kind is not None and kind != found:
        raise ModelSourceError(f"{source!r} is an {found!r} model, but kind={kind!r} was asked for.")
    if vae is None and found == "sdxl" and source == DEFAULT_MODELS["sdxl"]:
        vae = SDXL_FP16_VAE
    dtypes = dict(torch_dtype) if isinstance(torch_dtype, Mapping) else {"default": torch_dtype}

    def load(part: str, **kwargs):
        dtype = dtypes.get(part, dtypes.get("default"))
        return load_part(source, part, torch_dtype=dtype, variant=variant, revision=revision, **kwargs)

    parts = ["tokenizer", "text_encoder", "unet", "noise_scheduler"]
    parts += ["tokenizer_2", "text_encoder_2"] if found == "sdxl" else []
    loaded = {part: load(part) for part in parts}
    if vae:  # a VAE of its own is a standalone model folder or repository: no subfolder
        dtype = dtypes.get("vae", dtypes.get("default"))
        loaded["vae"] = load_part(vae, "vae", torch_dtype=dtype, subfolder="")
    else:
        loaded["vae"] = load("vae")
    components = Components(kind=found, source=source, **loaded)
    for module in (components.vae, components.unet, *components.text_encoders):
        module.eval()
    return components


# --------------------------------------------------------------------------------------------------------------------
# Pipelines


def sampling_scheduler(components: Components) -> DPMSolverMultistepScheduler:
    """A fast multistep solver (good images in ~25 steps) on the model's own training schedule."""
    return DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)


def build_pipeline(components: Components, scheduler=None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Assemble the stock diffusers pipeline from the components (no safety checker, no watermarker)."""
    scheduler = scheduler or sampling_scheduler(components)
    if components.kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_components(components: Components, folder: str | os.PathLike) -> Path:
    """Write a diffusers pipeline folder (safetensors) that the stock `from_pretrained` loads."""
    folder = Path(folder)
    # The folder carries the fast sampling scheduler; training reads the same config into a DDPMScheduler.
    pipeline = build_pipeline(components)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------------------------------
# The models of a run


def load_base(config: TrainConfig, torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None) -> Components:
    """The base model a run's settings name (`model`, `kind`, `vae`), as training loads it."""
    return load_components(config.model, kind=config.kind, vae=config.vae, torch_dtype=torch_dtype)  # type: ignore[arg-type]


def load_run_pipeline(run_dir: str | os.PathLike, device: torch.device | str | None = None, dtype=None):
    """The stock diffusers pipeline of a finished run: its `pipeline/` folder, or the base model with its LoRA."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ModelSourceError(f"{run_dir} is not a run folder (no config.json): pass the folder train() wrote.")
    config = TrainConfig.from_file(run_dir / "config.json")
    if (run_dir / "pipeline").is_dir():
        pipeline = build_pipeline(load_components(str(run_dir / "pipeline")))
    elif (run_dir / LORA_WEIGHT_NAME_SAFE).is_file():
        pipeline = build_pipeline(load_base(config))
        pipeline.load_lora_weights(run_dir)
    else:
        raise ModelSourceError(
            f"{run_dir} holds neither pipeline/ nor {LORA_WEIGHT_NAME_SAFE}: did its training finish?"
        )
    return pipeline.to(device or "cpu", dtype)
