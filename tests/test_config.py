"""TrainConfig: every field described for forms, every bad value refused by name, files and presets round-trip."""

import dataclasses
import json

import pytest

from dreambooth_lib.config import PRESETS, ConfigError, TrainConfig

SIMPLE_TYPES = {"str", "int", "float", "bool", "list[str]", "str | None", "int | None", "float | None"}


def test_every_field_has_help_and_a_simple_type_for_forms():
    for spec in dataclasses.fields(TrainConfig):
        assert spec.metadata["help"], spec.name
        assert spec.type in SIMPLE_TYPES, f"{spec.name}: {spec.type}"
        if "range" in spec.metadata:
            low, high = spec.metadata["range"]
            assert low < high, spec.name
        if "choices" in spec.metadata:
            default = getattr(TrainConfig(), spec.name)
            assert default in spec.metadata["choices"] or (default is None and "None" in spec.type), spec.name


def test_required_presets_exist_and_validate():
    names = ("tiny-cpu", "sd15-full-t4", "sd15-full-fast", "sd15-lora", "sdxl-lora-t4", "sdxl-lora-fast")
    for name in (*names, "seed-sd15", "seed-sdxl-lora"):
        assert PRESETS[name].validate() is PRESETS[name]


def test_seed_settings_are_reachable_as_presets():
    sd15, sdxl = PRESETS["seed-sd15"], PRESETS["seed-sdxl-lora"]
    assert (sd15.learning_rate, sd15.max_steps, sd15.train_text_encoder) == (5e-6, 400, True)
    assert (sdxl.learning_rate, sdxl.max_steps, sdxl.gradient_accumulation_steps, sdxl.use_lora) == (1e-4, 500, 4, True)


def test_t4_presets_use_the_memory_savers():
    sdxl = PRESETS["sdxl-lora-t4"]
    assert sdxl.resolution == 1024 and sdxl.use_8bit_adam and sdxl.gradient_checkpointing
    assert "fp16-fix" in sdxl.vae
    full = PRESETS["sd15-full-t4"]
    assert full.train_text_encoder and full.with_prior_preservation and not full.use_lora


@pytest.mark.parametrize(("t4", "fast"), [("sd15-full-t4", "sd15-full-fast"), ("sdxl-lora-t4", "sdxl-lora-fast")])
def test_fast_presets_train_the_t4_recipe_without_the_memory_savers(t4, fast):
    savers = {"mixed_precision", "use_8bit_adam", "gradient_checkpointing"}
    t4_settings, fast_settings = PRESETS[t4].to_dict(), PRESETS[fast].to_dict()
    assert {key for key in t4_settings if t4_settings[key] != fast_settings[key]} == savers
    assert (PRESETS[fast].mixed_precision, PRESETS[fast].use_8bit_adam, PRESETS[fast].gradient_checkpointing) == (
        "bf16",
        False,
        False,
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"resolution": 100}, "resolution=100 must be a multiple of 8"),
        ({"max_steps": 0}, "max_steps=0 is out of range"),
        ({"learning_rate": -1e-4}, "learning_rate=-0.0001 is out of range"),
        ({"prior_weight": -0.5}, "prior_weight=-0.5 is out of range"),
        ({"lora_rank": 0}, "lora_rank=0 is out of range"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8': choose one of"),
        ({"optimizer": "sgd"}, "optimizer='sgd': choose one of"),
        ({"max_steps": "400"}, "max_steps must be int"),
        ({"use_lora": 1}, "use_lora must be bool"),
        ({"validation_prompts": "a dog"}, "validation_prompts must be a list of strings"),
        ({"lr_warmup_steps": 500, "max_steps": 100}, "lr_warmup_steps=500 exceeds max_steps=100"),
        ({"use_dora": True}, "use_dora=True needs use_lora=True"),
        ({"center_crop": False}, "cache_latents=True needs center_crop=True"),
        ({"instance_prompt": " "}, "instance_prompt is empty"),
    ],
)
def test_validation_names_the_field_and_the_allowed_values(overrides, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace("[", r"\[")):
        TrainConfig(**overrides).validate()


def test_precision_is_checked_against_the_device():
    with pytest.raises(ConfigError, match="mixed_precision='fp16' needs a CUDA GPU"):
        TrainConfig(mixed_precision="fp16").validate("cpu")
    with pytest.raises(ConfigError, match="use_8bit_adam=True needs a CUDA GPU"):
        TrainConfig(use_8bit_adam=True).validate("cpu")
    with pytest.raises(ConfigError, match="attention='xformers' needs a CUDA GPU"):
        TrainConfig(attention="xformers").validate("cpu")
    assert TrainConfig(mixed_precision="bf16").validate("cpu").mixed_precision == "bf16"


def test_unknown_setting_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown setting 'learning_rte'. Did you mean 'learning_rate'"):
        TrainConfig.preset("tiny-cpu", learning_rte=1e-4)
    with pytest.raises(ConfigError, match="unknown preset 'sd3'"):
        TrainConfig.preset("sd3")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_and_from_file_round_trip(tmp_path, suffix):
    config = TrainConfig.preset("sd15-lora", validation_prompts=["a", "b c"], min_snr_gamma=5.0, class_dir=None)
    path = config.save(tmp_path / f"config{suffix}")
    assert TrainConfig.from_file(path) == config


def test_from_file_takes_a_subset_over_a_base_and_names_the_file_on_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"max_steps": 7, "learning_rate": 1}))
    config = TrainConfig.from_file(path, base=PRESETS["tiny-cpu"])
    assert (config.max_steps, config.learning_rate, config.resolution) == (7, 1, 64)
    path.write_text(json.dumps({"max_step": 7}))
    with pytest.raises(ConfigError, match="mine.json: unknown setting 'max_step'"):
        TrainConfig.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="mine.json is not valid JSON"):
        TrainConfig.from_file(path)


def test_command_line_assignments_are_parsed_by_field_type():
    config = PRESETS["tiny-cpu"].with_assignments(
        ["max_steps=3", "learning_rate=1e-4", "use_lora=true", "class_dir=null", "validation_prompts=[a sks dog, b]"]
    )
    assert config.max_steps == 3 and config.learning_rate == 1e-4 and config.use_lora is True
    assert config.class_dir is None and config.validation_prompts == ["a sks dog", "b"]
    with pytest.raises(ConfigError, match="max_steps='many': expected a int"):
        PRESETS["tiny-cpu"].with_assignments(["max_steps=many"])
    with pytest.raises(ConfigError, match="write it as key=value"):
        PRESETS["tiny-cpu"].with_assignments(["max_steps"])


def test_presets_are_not_shared_between_copies():
    config = TrainConfig.preset("tiny-cpu")
    config.validation_prompts.append("changed")
    assert "changed" not in PRESETS["tiny-cpu"].validation_prompts
