"""The memory estimate: the model families' sizes, the static part against live tensors, and the fit warning."""

import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_lib.config import PRESETS, TrainConfig
from dreambooth_lib.data import ENCODE_PIXELS
from dreambooth_lib.memory import (
    FAMILIES,
    FP32_ACTIVATION_FACTOR,
    GIB,
    VAE_DECODE_BYTES,
    VAE_ENCODE_BYTES,
    MemoryWarning,
    estimate_memory_gib,
    fit_warning,
    trained_parameters,
    warn_if_too_big,
)
from dreambooth_lib.models import build_pipeline, full_size_components, tiny_components
from dreambooth_lib.train import _make_optimizer, _set_up_trainable

REPO = Path(__file__).resolve().parent.parent


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def lora_sum(module: torch.nn.Module, names: tuple[str, ...]) -> int:
    """rank-1 LoRA size of the Linear layers whose names end in `names`: inputs + outputs, as memory.py counts it."""
    return sum(
        layer.in_features + layer.out_features
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and name.endswith(names)
    )


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def full_size_on_meta(request):
    """The full-size architectures on the meta device: real shapes, no memory, built in a second."""
    return full_size_components(request.param, device="meta")


def test_full_size_architectures_have_the_families_parameter_counts(full_size_on_meta):
    components = full_size_on_meta
    family = FAMILIES[components.kind]
    assert count(components.unet) == family.unet
    assert tuple(count(encoder) for encoder in components.text_encoders) == family.text_encoders
    assert count(components.vae) == family.vae
    assert lora_sum(components.unet, ("to_q", "to_k", "to_v", "to_out.0")) == family.unet_lora_per_rank
    text_lora = tuple(lora_sum(e, ("q_proj", "k_proj", "v_proj", "out_proj")) for e in components.text_encoders)
    assert text_lora == family.text_lora_per_rank
    assert components.source == f"random {components.kind} architecture" and not components.is_tiny
    assert not components.unet.training and components.unet.device.type == "meta"


def test_full_size_components_build_in_the_asked_dtype_and_leave_the_default_alone():
    components = full_size_components("sd", device="meta", dtype=torch.float16)
    assert {components.unet.dtype, components.vae.dtype, components.text_encoder.dtype} == {torch.float16}
    assert torch.get_default_dtype() == torch.float32


def test_full_size_components_make_a_pipeline_and_their_configs_round_trip(full_size_on_meta, tmp_path):
    components = full_size_on_meta
    pipeline = build_pipeline(components)
    assert pipeline.unet is components.unet and pipeline.vae_scale_factor == 8
    # What save_components writes beside the weights must rebuild the same architectures.
    components.unet.save_config(tmp_path / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp_path / "unet"))
    assert count(unet) == count(components.unet)
    for index, encoder in enumerate(components.text_encoders):
        encoder.config.save_pretrained(tmp_path / f"text_encoder_{index}")
        config = CLIPTextConfig.from_pretrained(tmp_path / f"text_encoder_{index}")
        model_class = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        with torch.device("meta"):
            assert count(model_class(config)) == count(encoder)


# --------------------------------------------------------------------------------------------------------------------
# The static part against live tensors


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def live_static_gib(components, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What a set-up really holds between steps: every module's weights, the gradients and the optimiser state."""
    modules = (components.unet, components.vae, *components.text_encoders)
    parameters = list({id(p): p for module in modules for p in module.parameters()}.values())
    state = [value for values in optimizer.state.values() for value in values.values() if torch.is_tensor(value)]
    return {
        "weights": tensor_bytes(parameters) / GIB,
        "gradients": tensor_bytes(p.grad for p in parameters if p.grad is not None) / GIB,
        "optimizer_states": tensor_bytes(state) / GIB,
    }


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(train_text_encoder=True, mixed_precision="no"),
        dict(train_text_encoder=True, mixed_precision="bf16"),
        dict(train_text_encoder=False, mixed_precision="bf16", optimizer="prodigy", learning_rate=1.0),
        dict(use_lora=True, lora_rank=4, train_text_encoder=False, mixed_precision="no"),
        dict(use_lora=True, lora_rank=8, train_text_encoder=True, mixed_precision="bf16"),
    ],
    ids=["full+text-fp32", "full+text-bf16", "full-prodigy-bf16", "lora-fp32", "lora+text-bf16"],
)
def test_static_estimate_matches_the_tensors_training_sets_up(kind, overrides):
    """Weights, gradients and optimiser state as train.py creates them (8-bit Adam needs CUDA: not here)."""
    config = TrainConfig.preset("tiny-cpu", kind=kind, **overrides)
    components = tiny_components(kind)
    weight_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    trainable = _set_up_trainable(components, config, weight_dtype, torch.device("cpu"))
    optimizer = _make_optimizer(config, trainable, components)
    for parameter in trainable:
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # creates the optimiser's state
    estimate = estimate_memory_gib(config)
    live = live_static_gib(components, optimizer)
    assert trained_parameters(config) == sum(p.numel() for p in trainable)
    for part, value in live.items():
        assert getattr(estimate, part) == pytest.approx(value, rel=0.01), part


# --------------------------------------------------------------------------------------------------------------------
# Activations: the benchmark's figures


def test_activation_figures_are_the_benchmarks_rounded_up():
    results = json.loads((REPO / "benchmarks" / "results" / "activation_memory.json").read_text())
    for kind, measured in results["summary"].items():
        sizes = FAMILIES[kind].activations
        pairs = {
            "full": (sizes.full, measured["full"]["per_image_gib"]),
            "full checkpointed": (sizes.full_checkpointed, measured["full"]["checkpointed_per_image_gib"]),
            "lora": (sizes.lora, measured["lora"]["per_image_gib"]),
            "lora checkpointed": (sizes.lora_checkpointed, measured["lora"]["checkpointed_per_image_gib"]),
            "text encoders": (sizes.text_encoders, measured["text_encoder_per_prompt_gib"]),
        }
        for name, (used, benchmark) in pairs.items():
            assert benchmark <= used <= benchmark + 0.01, (kind, name)
        factors = [
            measured[training][key]
            for training in ("full", "lora")
            for key in ("fp32_factor", "fp32_checkpointed_factor")
        ]
        assert max(factors) <= FP32_ACTIVATION_FACTOR
    scaling = [row["relative_to_native"] for row in results["scaling"]]
    assert all(abs(ratio - 1) < 0.03 for ratio in scaling), "activations are no longer linear in pixels and images"


def test_vae_figures_are_the_benchmarks_rounded_up():
    results = json.loads((REPO / "benchmarks" / "results" / "vae_memory.json").read_text())
    for case in results["cases"]:
        assert case["encode_bytes_per_pixel_byte"] <= VAE_ENCODE_BYTES <= case["encode_bytes_per_pixel_byte"] + 1
        assert case["decode_bytes_per_pixel_byte"] <= VAE_DECODE_BYTES <= case["decode_bytes_per_pixel_byte"] + 1


# --------------------------------------------------------------------------------------------------------------------
# The estimate against measured peaks

# Whole-process peaks, torch.cuda.max_memory_allocated in GiB: measured on one NVIDIA H200 on 2026-11-29 by a session
# (issue 17's table), full-size SD 1.5 / SDXL architectures with random weights, the sample dog photos, one process
# per run, each preset with the benchmark's changes (a few steps, one validation image, no checkpoints). All were
# measured BEFORE train.py parked the frozen VAE and text encoders for the loop and before latents were encoded by
# pixels (it encoded 4 images per VAE call at any resolution): `measured_code` below estimates that code.
MEASURED_PEAK_GIB = {
    "sd15-full-t4": 9.65,
    "sd15-full-fast": 15.69,
    "sd15-lora": 5.23,
    "sdxl-lora-t4": 12.62,
    "sdxl-lora-fast": 13.96,
}


def measured_code(config: TrainConfig):
    """The estimate of the code that was measured: nothing parked, latents encoded 4 images per call."""
    estimate = estimate_memory_gib(config)
    encoded_now = max(1, ENCODE_PIXELS // config.resolution**2)
    return dataclasses.replace(estimate, parked=0.0, encoding=estimate.encoding * 4 / encoded_now)


@pytest.mark.parametrize("preset", sorted(MEASURED_PEAK_GIB))
def test_estimate_is_within_15_percent_of_the_measured_peak(preset):
    config = PRESETS[preset].replace(num_validation_images=1)
    estimate = measured_code(config).total
    assert estimate == pytest.approx(MEASURED_PEAK_GIB[preset], rel=0.15), f"{preset}: estimate {estimate:.2f} GiB"


def test_sdxl_t4_peak_came_from_caching_latents_and_no_longer_does():
    """The measured 12.6 GiB was the latent cache's 4 images per VAE call at 1024 px; by pixels and with the frozen
    parts parked, the estimate for the code as it is stays under the issue's target (11.7 GiB, the official script)."""
    config = PRESETS["sdxl-lora-t4"].replace(num_validation_images=1)
    assert measured_code(config).when == "caching latents"
    now = estimate_memory_gib(config)
    assert now.total <= 11.7
    # What parking saves in the loop, against the parked modules' parameters counted on the full-size architecture
    # (fp16, the T4 recipe's frozen dtype; the fp16-fix VAE runs in fp16 too).
    sdxl = full_size_components("sdxl", device="meta")
    counted = sum(count(module) for module in (sdxl.vae, *sdxl.text_encoders)) * 2 / GIB
    assert measured_code(config).loop - now.loop == pytest.approx(counted, rel=0.01)
    assert counted > 1.6  # the 1.7 GiB a T4 needs for activations
    for preset in ("sd15-full-t4", "sd15-lora", "sdxl-lora-t4"):  # every T4 preset fits a 15 GiB card
        assert estimate_memory_gib(PRESETS[preset]).fits(15.0), preset


# --------------------------------------------------------------------------------------------------------------------
# The fit warning


def test_fit_warning_is_none_when_the_run_fits():
    assert fit_warning(PRESETS["sd15-full-t4"], 15.0) is None
    assert fit_warning(PRESETS["sdxl-lora-t4"], 15.0) is None


def test_fit_warning_names_the_peak_the_card_and_only_the_savers_not_on_yet():
    fast = PRESETS["sd15-full-fast"]  # bf16, AdamW, no checkpointing: meant for 40 GB cards
    message = fit_warning(fast, 15.0)
    assert f"~{estimate_memory_gib(fast).total:.1f} GiB peak" in message and "(15.0 GiB" in message
    for saver in ("gradient_checkpointing=True", "use_8bit_adam=True", "use_lora=True", "resolution=384"):
        assert saver in message
    assert "mixed_precision" not in message and "train_batch_size" not in message
    # The T4 preset on an 8 GiB card: checkpointing and 8-bit Adam are on already.
    message = fit_warning(PRESETS["sd15-full-t4"], 8.0)
    assert "use_lora=True" in message
    assert "gradient_checkpointing" not in message and "use_8bit_adam" not in message
    # Each saver comes with what it saves, and batches become accumulation.
    message = fit_warning(PRESETS["sdxl-lora-fast"].replace(train_batch_size=2), 15.0)
    assert "train_batch_size=1 with gradient_accumulation_steps=8 (-7.3 GiB)" in message


@pytest.fixture
def fake_15_gib_gpu(monkeypatch):
    """torch.cuda reports a 15 GiB card (the tests run without one)."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(total_memory=15 * GIB))


def test_warns_on_a_cuda_device_when_the_run_does_not_fit(fake_15_gib_gpu):
    too_big = PRESETS["sd15-full-t4"].replace(use_8bit_adam=False)
    with pytest.warns(MemoryWarning, match="use_8bit_adam=True"):
        warn_if_too_big(too_big, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryWarning)
        warn_if_too_big(PRESETS["sd15-full-t4"], "cuda")
        warn_if_too_big(too_big.replace(mixed_precision="bf16"), "cpu")  # no CUDA card to compare with: no warning
