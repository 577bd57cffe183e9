"""The memory estimate: the model families' sizes, the static part against live tensors, and the fit warning."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_lib.memory import FAMILIES
from dreambooth_lib.models import build_pipeline, full_size_components


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
