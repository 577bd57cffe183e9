"""The stand-in hub cache resolves the course's real hub ids offline, and what it found in loading is fixed."""

import json

import pytest
import torch

from dreambooth_lib.cli import main
from dreambooth_lib.evaluate import load_backbones
from dreambooth_lib.families import DEFAULT_MODELS, SDXL_FP16_VAE
from dreambooth_lib.models import ModelSourceError, load_components, load_part


def test_real_ids_resolve_offline_at_native_sizes(standin_hub_cache, offline_hub):
    offline_hub(standin_hub_cache)
    sd = load_components(DEFAULT_MODELS["sd"])
    sdxl = load_components(DEFAULT_MODELS["sdxl"])
    assert (sd.kind, sd.resolution, sd.unet.config.sample_size, sd.vae.config.sample_size) == ("sd", 512, 64, 512)
    assert (sdxl.kind, sdxl.resolution, sdxl.unet.config.sample_size) == ("sdxl", 1024, 128)
    assert sdxl.vae.config.force_upcast is False  # the fp16-fix VAE, not the base repository's own
    backbones = load_backbones(tiny=False, device="cpu")
    assert (backbones.dino.config.image_size, backbones.clip.config.vision_config.image_size) == (224, 224)


def test_parts_load_in_float32_when_no_dtype_is_asked_for(standin_hub_cache, offline_hub, standin_hub):
    """SDXL's text encoders' config.json records float16; loading without a dtype must still give float32 on a CPU
    (transformers 5 honours the recorded dtype: class images then failed with `c10::Half != float`)."""
    offline_hub(standin_hub_cache)
    repo = standin_hub_cache / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots"
    config = json.loads(next(repo.glob("*/text_encoder_2/config.json")).read_text())
    assert "float16" in (config.get("dtype"), config.get("torch_dtype"))
    for part in ("text_encoder", "text_encoder_2", "unet"):
        assert load_part(DEFAULT_MODELS["sdxl"], part).dtype == torch.float32, part
    assert load_part(DEFAULT_MODELS["sdxl"], "unet", torch_dtype=torch.float16).dtype == torch.float16


@pytest.fixture
def sd15_without_unet_weights(tmp_path, standin_hub, offline_hub):
    cache = standin_hub.write_standin_hub(tmp_path / "hub", only=[DEFAULT_MODELS["sd"]])
    for weights in cache.glob("models--*/snapshots/*/unet/*.safetensors"):
        weights.unlink()
    return offline_hub(cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_missing_weights_are_one_line_naming_repository_and_files(sd15_without_unet_weights, dtype):
    with pytest.raises(ModelSourceError) as caught:
        load_part(DEFAULT_MODELS["sd"], "unet", torch_dtype=dtype)
    message = str(caught.value)
    assert "\n" not in message and DEFAULT_MODELS["sd"] in message
    assert "unet/diffusion_pytorch_model.safetensors" in message
    assert ("unet/diffusion_pytorch_model.fp16.safetensors" in message) == (dtype == torch.float16)


def test_cli_reports_missing_weights_as_an_error_line(sd15_without_unet_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODE", "full")
    out = tmp_path / "grid.png"
    code = main(["generate", "--prompt", "a dog", "--model", DEFAULT_MODELS["sd"], "--out", str(out), "--steps", "1"])
    stderr = capsys.readouterr().err  # also holds loading progress bars and the libraries' own log lines
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in stderr
    assert DEFAULT_MODELS["sd"] in errors[0] and "unet/diffusion_pytorch_model.safetensors" in errors[0]
    assert not out.exists()


def test_standin_cache_has_real_layout(standin_hub_cache, standin_hub):
    """refs/<ref> holds the commit a snapshot folder is named by, for every repository, at the refs the library pins."""
    from dreambooth_lib.evaluate import CLIP_MODEL, CLIP_REVISION, DINO_MODEL, DINO_REVISION

    wanted = {DEFAULT_MODELS["sd"]: "main", DEFAULT_MODELS["sdxl"]: "main", SDXL_FP16_VAE: "main"}
    wanted |= {DINO_MODEL: DINO_REVISION, CLIP_MODEL: CLIP_REVISION}
    for repo_id, ref in wanted.items():
        repo = standin_hub_cache / ("models--" + repo_id.replace("/", "--"))
        commit = (repo / "refs" / ref).read_text()
        assert (repo / "snapshots" / commit).is_dir(), repo_id
    sd = standin_hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots"
    files = {p.relative_to(next(sd.iterdir())).as_posix() for p in sd.glob("*/**/*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"} <= files
    assert {"text_encoder/model.fp16.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"} <= files
