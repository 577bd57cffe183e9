"""The benchmarks measure what they say: one probe times both sides' optimiser steps and reads their peak, --card-gib
reaches the T4 processes, the official scripts get the same settings as ours, and the driver runs both sides end to
end. (Speed itself is measured by the benchmarks, never asserted here.)"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from official_scripts import FIELD_FLAGS, UNUSED, require_shared, script_arguments, script_settings
from transformers import CLIPTextModel

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# A stand-in for an official script: parses the options it is given, takes --max_train_steps optimiser steps.
STAND_IN = """
import argparse, sys, torch
parser = argparse.ArgumentParser()
parser.add_argument("--max_train_steps", type=int)
parser.add_argument("--exit", type=int, default=0)
args, unknown = parser.parse_known_args()
layer = torch.nn.Linear(4, 4)
optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
for _ in range(args.max_train_steps):
    layer(torch.randn(2, 4)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
print("unknown options:", unknown)
sys.exit(args.exit)
"""


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other by name, as when run by their path
    try:
        names = ("common", "probe", "train_speed", "class_images", "seed_recipe")
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_step_durations_drop_the_warm_up_steps(benchmarks):
    durations = benchmarks["common"].step_durations([1.0, 3.0, 3.5, 4.5, 5.0], warmup=2)
    assert durations == [0.5, 1.0, 0.5]  # steps 3, 4 and 5; the first two were warm-up
    with pytest.raises(ValueError, match="at least one warm-up step"):
        benchmarks["common"].step_durations([1.0, 2.0], warmup=0)


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_our_loop_runs_neither_vae_nor_frozen_text_encoder_per_step(benchmarks, monkeypatch, tmp_path):
    from dreambooth_lib.train import train

    train_speed = benchmarks["train_speed"]
    config = train_speed.bench_config(train_speed.Case("sd15-lora", 1, 1), "tiny", tmp_path, cpu=True)
    config = config.replace(train_text_encoder=False)
    counts = []
    for steps in (2, 6):
        encodes = _count_calls(monkeypatch, AutoencoderKL, "encode")
        texts = _count_calls(monkeypatch, CLIPTextModel, "forward")
        train(config.replace(max_steps=steps, output_dir=str(tmp_path / str(steps))))
        counts.append((len(encodes), len(texts)))
        monkeypatch.undo()
    # Images and prompts are encoded once, before the loop (and prompts again for the final samples): four more
    # steps add no encoder call.
    assert counts[0] == counts[1] and counts[0][0] > 0 and counts[0][1] > 0  # both counters see their calls


def test_class_image_benchmark_reports_both_generators(benchmarks, tmp_path, capsys):
    output = tmp_path / "class.json"
    assert benchmarks["class_images"].main(["--images", "2", "--json", str(output)]) == 0
    (case,) = json.loads(output.read_text())["cases"]
    assert case["reference"] == {"sampler": "PNDMScheduler", "steps": 50, "batch_size": 1}
    assert case["ours"]["sampler"] == "DPMSolverMultistepScheduler" and case["ours"]["steps"] == 25
    assert case["images_per_second"]["ours"] > 0 and case["images_per_second"]["reference"] > 0
    assert "tiny sd" in capsys.readouterr().out


def run_probe(tmp_path: Path, *arguments: str) -> dict:
    """probe.py on the stand-in script; options before "--profile-after" go to the script, that one to the probe."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    result = tmp_path / "probe.json"
    probe = [sys.executable, str(BENCHMARKS / "probe.py"), "--result", str(result), "--card-gib", "15"]
    if "--profile-after" in arguments:
        at = arguments.index("--profile-after")
        probe, arguments = [*probe, *arguments[at : at + 2]], arguments[:at]
    subprocess.run([*probe, "--", str(script), *arguments], check=False)
    return json.loads(result.read_text())


def test_probe_times_each_optimiser_step_and_reports_the_peak_and_exit(tmp_path):
    report = run_probe(tmp_path, "--max_train_steps", "5")
    assert report["exit"] == 0 and report["card_gib"] == 15.0
    assert len(report["stamps"]) == 5 and report["stamps"] == sorted(report["stamps"])
    assert report["stamps"][0] > 0 and report["stamps"][-1] <= report["seconds"]
    assert report["peak"]["kind"] == "CPU max RSS" and report["peak"]["rss_gib"] > 0.05
    failed = run_probe(tmp_path, "--max_train_steps", "6", "--exit", "3", "--profile-after", "2")
    assert failed["exit"] == 3 and len(failed["stamps"]) == 6  # a failed run still reports what it did
    assert "aten::" in failed["profile"] and "Self CPU" in failed["profile"]  # steps 3-5 were profiled


def test_card_gib_is_the_share_of_the_card_the_allocator_gets(benchmarks):
    fraction = benchmarks["probe"].memory_fraction
    assert fraction(15, 140 * 2**30) == pytest.approx(15 / 140)
    assert fraction(15, 15 * 2**30) == 1.0
    with pytest.raises(ValueError, match="more than this card"):
        fraction(16, 15 * 2**30)
    with pytest.raises(ValueError, match="positive"):
        fraction(0, 15 * 2**30)


@pytest.mark.parametrize(
    ("preset", "script", "card"),
    [
        ("sd15-full-t4", "train_dreambooth.py", 15.0),
        ("sdxl-lora-t4", "train_dreambooth_lora_sdxl.py", 15.0),
        ("sd15-full-fast", "train_dreambooth.py", None),  # meant for larger cards: never capped
    ],
)
def test_both_sides_get_the_same_settings_and_the_t4_ones_the_card(
    benchmarks, monkeypatch, tmp_path, preset, script, card
):
    train_speed = benchmarks["train_speed"]
    official = require_shared(train_speed.DEFAULT_OFFICIAL)
    calls = []

    def fake_probe(target, *, card_gib, environment, timeout, profile_after=None):
        calls.append((target, card_gib))
        return {"exit": 0, "stamps": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "seconds": 7.0, "peak": {"allocated_gib": 1.0}}

    monkeypatch.setattr(train_speed, "run_probed", fake_probe)
    case = train_speed.Case(preset, warmup=2, steps=3)
    row = train_speed.run_case(case, "/models/random-sd", tmp_path, official, cpu=False, card_gib=15.0)
    (ours, ours_card), (theirs, their_card) = calls
    assert ours_card == their_card == card and row["card_gib"] == card
    assert theirs[0] == str(official / script)
    config = train_speed.TrainConfig.from_file(ours[-1])
    options = dict(option.removeprefix("--").partition("=")[::2] for option in theirs[1:])
    assert options["pretrained_model_name_or_path"] == config.model == "/models/random-sd"
    assert config.max_steps == 5
    # Every setting, as the script's own argparse reads the command line (its defaults for what is left out).
    theirs_settings = script_settings(official / script, theirs[1:])
    differ = {
        field: (value, getattr(config, field))
        for field, value in theirs_settings.items()
        if value != UNUSED and value != getattr(config, field) and not _unused_by(config, field)
    }
    assert differ == {}, "(theirs, ours)"
    # Every other option given, one by one.
    others = {
        "instance_data_dir": config.instance_dir,
        "instance_prompt": config.instance_prompt,
        "output_dir": str(tmp_path / "official"),
        "checkpointing_steps": str(10**9),  # never, as checkpointing_steps=0 does for ours
        "class_data_dir": config.class_dir if config.with_prior_preservation else None,
        "class_prompt": config.class_prompt if config.with_prior_preservation else None,
        # Ours caches a frozen text encoder's prompt embeddings; the SD script does so when asked.
        "pre_compute_text_embeddings": ""
        if script == "train_dreambooth.py" and not config.train_text_encoder
        else None,
    }
    mapped = {flag.removeprefix("--") for flag in FIELD_FLAGS.values()}
    assert {name: options[name] for name in options if name not in mapped} == {
        name: value for name, value in others.items() if value is not None
    }
    for name in options:  # every option given exists in the script
        assert f"--{name}" in script_arguments(official / script), name
    assert row["time_ratio"] == 1.0 and row["ours"]["median_s_per_step"] == 1.0


def _unused_by(config, field: str) -> bool:
    """Settings that do not act in this configuration (their values need not match), and the one deliberate
    difference: ours encodes each image once (cache_latents, the design's step 4), the scripts every step."""
    return (
        field == "cache_latents"
        or (field in ("num_class_images", "prior_weight") and not config.with_prior_preservation)
        or (field == "text_encoder_lr" and not config.train_text_encoder)
    )


def test_train_speed_runs_ours_and_the_official_script_under_the_probe(benchmarks, tmp_path, capsys):
    official = tmp_path / "official"
    official.mkdir()
    (official / "train_dreambooth.py").write_text(STAND_IN)
    output = tmp_path / "speed.json"
    arguments = ["--official", str(official), "--steps", "2", "--json", str(output)]
    assert benchmarks["train_speed"].main(arguments) == 0
    (case,) = json.loads(output.read_text())["cases"]
    warmup = case["warmup_steps"]
    for side in ("ours", "official"):
        assert case[side]["exit"] == 0 and case[side]["steps"] == warmup + 2
        assert len(case[side]["step_seconds"]) == 2 and case[side]["median_s_per_step"] > 0
        assert case[side]["peak"]["kind"] == "CPU max RSS"
    assert case["time_ratio"] == pytest.approx(
        case["ours"]["median_s_per_step"] / case["official"]["median_s_per_step"]
    )
    assert "| tiny-cpu |" in capsys.readouterr().out


def test_seed_recipe_reports_where_the_time_went(benchmarks):
    phases = benchmarks["seed_recipe"].phases
    probe = {"exit": 0, "stamps": [10.0, 11.0, 12.0, 13.5, 14.0], "seconds": 20.0, "peak": {"rss_gib": 1.0}}
    report = phases(probe, warmup=2)
    assert report["before_first_step_s"] == 10.0 and report["loop_s"] == 4.0 and report["after_last_step_s"] == 6.0
    assert report["median_s_per_step"] == 1.0  # steps 3-5 took 1.0, 1.5 and 0.5 s
    assert phases({**probe, "exit": 1, "error": "OutOfMemoryError"})["error"] == "OutOfMemoryError"
