"""The benchmarks measure what they say: the reference loop does the per-step work ours avoids, the scripts run end
to end on the tiny model and report both loops. (Speed itself is measured by the benchmarks, never asserted here.)"""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other by name, as when run by their path
    try:
        names = ("common", "reference_loop", "train_speed", "class_images")
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


def test_reference_loop_encodes_images_and_prompts_every_step_and_trains(benchmarks, monkeypatch, tmp_path):
    train_speed = benchmarks["train_speed"]
    case = train_speed.Case("sd15-lora", warmup=1, steps=2)  # a frozen text encoder: the reference still runs it
    config = train_speed.bench_config(case, "tiny", tmp_path, dry_run=True)
    encodes = _count_calls(monkeypatch, AutoencoderKL, "encode")
    texts = _count_calls(monkeypatch, CLIPTextModel, "forward")
    losses = []
    benchmarks["reference_loop"].train_reference(config, lambda step, loss: losses.append((step, loss)))
    assert [step for step, _ in losses] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses)
    assert len(encodes) == 3 and len(texts) == 3  # one batch per step, each encoded anew


def test_our_loop_runs_neither_vae_nor_frozen_text_encoder_per_step(benchmarks, monkeypatch, tmp_path):
    from dreambooth_lib.train import train

    train_speed = benchmarks["train_speed"]
    config = train_speed.bench_config(train_speed.Case("sd15-lora", 1, 1), "tiny", tmp_path, dry_run=True)
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
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_train_speed_reports_both_loops_on_the_tiny_model(benchmarks, tmp_path, capsys):
    output = tmp_path / "speed.json"
    assert benchmarks["train_speed"].main(["--steps", "3", "--json", str(output)]) == 0
    report = json.loads(output.read_text())
    (case,) = report["cases"]
    for loop in ("ours", "reference"):
        assert len(case[loop]["step_seconds"]) == 3 and case[loop]["median_s_per_step"] > 0
        assert case[loop]["peak_kind"] == "CPU max RSS" and case[loop]["peak_gib"] > 0.1
    assert case["time_ratio"] == pytest.approx(
        case["ours"]["median_s_per_step"] / case["reference"]["median_s_per_step"]
    )
    assert "| tiny-cpu |" in capsys.readouterr().out


def test_class_image_benchmark_reports_both_generators(benchmarks, tmp_path, capsys):
    output = tmp_path / "class.json"
    assert benchmarks["class_images"].main(["--images", "2", "--json", str(output)]) == 0
    (case,) = json.loads(output.read_text())["cases"]
    assert case["reference"] == {"sampler": "PNDMScheduler", "steps": 50, "batch_size": 1}
    assert case["ours"]["sampler"] == "DPMSolverMultistepScheduler" and case["ours"]["steps"] == 25
    assert case["images_per_second"]["ours"] > 0 and case["images_per_second"]["reference"] > 0
    assert "tiny sd" in capsys.readouterr().out
