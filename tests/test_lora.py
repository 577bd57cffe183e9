"""LoRA set-up, saving for the stock pipelines' `load_lora_weights`, and the kohya/A1111 export."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreambooth_lib.generate import generate
from dreambooth_lib.lora import (
    LORA_WEIGHTS_NAME,
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    add_lora,
    export_kohya,
    load_lora,
    save_lora,
)
from dreambooth_lib.models import build_pipeline, tiny_components

RANK, ALPHA = 4, 8  # alpha != rank, so a loader that ignored the saved alpha would scale the update wrongly


def _image(pipeline) -> np.ndarray:
    image = generate(pipeline, "a photo of sks dog", num_images=1, seed=3, num_inference_steps=2, progress=False)[0]
    return np.asarray(image, dtype=np.float64)


def _perturb_lora_b(components) -> None:
    """Fresh LoRA B matrices are zero (the update starts at nothing); make them non-zero, as training would."""
    generator = torch.Generator().manual_seed(0)
    for module in (components.unet, *components.text_encoders):
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data = 0.3 * torch.randn(parameter.shape, generator=generator)


def _keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def trained(request, tmp_path_factory):
    """Tiny components with perturbed UNet + text-encoder adapters, saved; the image they and the base generate."""
    components = tiny_components(request.param)
    add_lora(components, rank=RANK, alpha=ALPHA, train_text_encoder=True)
    _perturb_lora_b(components)
    folder = tmp_path_factory.mktemp(f"lora-{request.param}")
    lora_file = save_lora(components, folder)
    base_image = _image(build_pipeline(tiny_components(request.param)))
    return request.param, lora_file, _image(build_pipeline(components)), base_image


def test_add_lora_returns_only_fp32_adapters_on_an_fp16_base():
    components = tiny_components("sdxl").to("cpu", torch.float16)
    params = add_lora(components, rank=RANK, train_text_encoder=True)
    # Every trainable tensor is an adapter matrix: 2 per adapted projection.
    unet_layers = sum(
        1 for n, _ in components.unet.named_modules() if n.endswith(UNET_TARGET_MODULES) and "lora" not in n
    )
    text_layers = 2 * 2 * len(TEXT_ENCODER_TARGET_MODULES)  # 2 encoders x 2 layers x 4 projections
    assert len(params) == 2 * (unet_layers + text_layers)
    assert {p.dtype for p in params} == {torch.float32}
    assert components.unet.conv_in.weight.dtype == torch.float16  # the frozen base stays fp16 (memory)
    modules = (components.unet, *components.text_encoders)
    trainable = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert all(p.shape[0] == RANK or p.shape[1] == RANK for p in params)


def test_lora_on_an_fp16_base_takes_a_step_under_the_fp16_gradient_scaler():
    # fp16 trainable weights make GradScaler.unscale_ raise "Attempting to unscale FP16 gradients".
    components = tiny_components("sd").to("cpu", torch.float16)
    params = add_lora(components, rank=RANK, train_text_encoder=True)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a weight moves only by its gradient
    scaler = torch.amp.GradScaler("cpu")
    ids = components.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.autocast("cpu", dtype=torch.float16):
        embeddings = components.text_encoder(ids)[0]
        prediction = components.unet(torch.randn(1, 4, 8, 8), 500, encoder_hidden_states=embeddings).sample
    scaler.scale(prediction.float().pow(2).mean()).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    moved = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
    # B starts at zero, so only B has a gradient on the first step: every B, UNet's and text encoder's, took a step
    # (the scaler skips the step when any gradient is inf/NaN).
    assert sum(moved) == len(params) // 2


def test_dora_adds_trainable_magnitudes_and_round_trips(tmp_path):
    components = tiny_components("sd")
    params = add_lora(components, rank=RANK, use_dora=True)
    magnitudes = [n for n, p in components.unet.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert magnitudes and len(params) == 3 * len(magnitudes)  # A, B and a magnitude per adapted projection
    _perturb_lora_b(components)
    expected = _image(build_pipeline(components))
    lora_file = save_lora(components, tmp_path)
    assert any("lora_magnitude_vector" in key for key in _keys(lora_file))
    loaded = _image(load_lora(build_pipeline(tiny_components("sd")), lora_file))
    assert np.abs(loaded - expected).max() <= 1
    with pytest.raises(ValueError, match="DoRA"):
        export_kohya(lora_file, tmp_path / "kohya.safetensors")


def test_stock_load_lora_weights_reproduces_the_trained_image(trained):
    kind, lora_file, trained_image, base_image = trained
    assert lora_file.name == LORA_WEIGHTS_NAME
    prefixes = {key.split(".")[0] for key in _keys(lora_file)}
    assert prefixes == ({"unet", "text_encoder", "text_encoder_2"} if kind == "sdxl" else {"unet", "text_encoder"})
    pipeline = build_pipeline(tiny_components(kind))
    pipeline.load_lora_weights(lora_file.parent)  # the stock call, on the folder
    loaded_image = _image(pipeline)
    assert np.abs(loaded_image - base_image).mean() > 2  # the adapters change the picture for the same seed...
    assert np.abs(loaded_image - trained_image).max() <= 1  # ...into exactly the trained model's (rank, alpha kept)


def test_lora_scale_zero_gives_the_base_image(trained):
    kind, lora_file, _, base_image = trained
    scaled = _image(load_lora(build_pipeline(tiny_components(kind)), lora_file, scale=0.0))
    assert np.abs(scaled - base_image).max() <= 1


def test_kohya_export_names_keys_like_kohya_and_loads_to_the_same_image(trained, tmp_path):
    kind, lora_file, trained_image, _ = trained
    kohya_file = export_kohya(lora_file.parent, tmp_path / "lora_kohya.safetensors")
    with safe_open(str(kohya_file), framework="pt") as handle:
        weights = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    modules = {key.split(".")[0] for key in weights}
    text_prefixes = ("lora_te1_", "lora_te2_") if kind == "sdxl" else ("lora_te_",)
    assert {m.split("_text_model_")[0] + "_" for m in modules if "_text_model_" in m} == set(text_prefixes)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert f"{text_prefixes[-1]}text_model_encoder_layers_1_self_attn_out_proj" in modules
    assert len(weights) == 3 * len(modules) == 3 * len(_keys(lora_file)) // 2
    for module in modules:
        assert weights[f"{module}.lora_down.weight"].shape[0] == RANK
        assert weights[f"{module}.lora_up.weight"].shape[1] == RANK
        assert weights[f"{module}.alpha"].item() == ALPHA
    # diffusers reads kohya files too: the export must give the very image the diffusers file gives.
    pipeline = build_pipeline(tiny_components(kind))
    pipeline.load_lora_weights(str(tmp_path), weight_name=kohya_file.name)
    assert np.abs(_image(pipeline) - trained_image).max() <= 1


def test_generate_command_applies_a_lora_file(trained, tmp_path):
    from PIL import Image

    from dreambooth_lib.cli import main

    kind, lora_file, trained_image, _ = trained
    out = tmp_path / "grid.png"
    prompt = ["--prompt", "a photo of sks dog", "--seed", "3", "--num-images", "1", "--steps", "2"]
    assert (
        main(["generate", *prompt, "--model", "tiny", "--kind", kind, "--lora", str(lora_file), "--out", str(out)]) == 0
    )
    assert np.abs(np.asarray(Image.open(out), dtype=np.float64) - trained_image).max() <= 1


def test_save_lora_unwraps_modules_wrapped_for_parallel_training(tmp_path):
    components = tiny_components("sd")
    add_lora(components, rank=RANK, train_text_encoder=True)
    plain = _keys(save_lora(components, tmp_path / "plain"))
    # accelerate.prepare wraps modules (DistributedDataParallel); DataParallel is the same kind of wrapper on a CPU.
    components.unet = torch.nn.DataParallel(components.unet)
    components.text_encoder = torch.nn.DataParallel(components.text_encoder)
    assert _keys(save_lora(components, tmp_path / "wrapped")) == plain


def test_bad_lora_settings_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="rank=0"):
        add_lora(tiny_components("sd"), rank=0)
    with pytest.raises(ValueError, match="add_lora"):
        save_lora(tiny_components("sd"), tmp_path)
    with pytest.raises(FileNotFoundError, match="save_lora"):
        export_kohya(tmp_path / "missing.safetensors", tmp_path / "out.safetensors")
