"""Tiny training runs shared by the resume, interruption and full-disk tests: settings, a step recorder, comparisons.

A resume test must tell a resumed run from one that silently started again at step 0 (the tiny runs are deterministic,
so both end alike): `Steps` records which steps a run really trained, and `TrainResult.resumed_from` says where from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.losslog import read_loss_log

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "data" / "subjects" / "dog"

LORA_SETTINGS = dict(
    use_lora=True,
    learning_rate=5e-2,
    with_prior_preservation=False,
    max_steps=4,
    checkpointing_steps=2,
    checkpoints_total_limit=None,
    validation_prompts=["a photo of sks dog"],
)


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    """The tiny-cpu preset on the sample dog, 4 steps, everything written under `tmp_path`."""
    settings = dict(
        instance_dir=str(DOG),
        output_dir=str(tmp_path / "run"),
        class_dir=str(tmp_path / "class_images"),
        num_class_images=2,
        class_inference_steps=2,
        max_steps=4,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    settings.update(overrides)
    return TrainConfig.preset("tiny-cpu", **settings)


class Steps(list):
    """A train() callback that records the optimiser steps the run trained (in this process)."""

    def __call__(self, step: int, row: dict) -> None:
        self.append(step)


def train_in_subprocess(config: TrainConfig, env: dict[str, str], folder: Path) -> subprocess.CompletedProcess:
    """Run train(config) in a fresh Python process with extra environment variables (e.g. a test hook)."""
    config_file = config.save(folder / "settings.json")
    code = "import sys; from dreambooth_lib.config import TrainConfig; from dreambooth_lib.train import train; "
    code += "train(TrainConfig.from_file(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code, str(config_file)], capture_output=True, text=True, env=env)


def weights(output: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's output: the LoRA file, or each safetensors file of the pipeline folder."""
    if output.is_file():
        return load_file(output)
    found = {}
    for path in sorted(output.rglob("*.safetensors")):
        prefix = path.relative_to(output).parent.as_posix()
        found.update({f"{prefix}.{name}": tensor for name, tensor in load_file(path).items()})
    return found


def assert_same_run(resumed, straight) -> None:
    """The resumed run ended where the uninterrupted one did: every step's loss, the written log, every weight."""
    steps = [row["step"] for row in straight.losses]
    assert [row["step"] for row in resumed.losses] == steps
    assert [row["loss"] for row in resumed.losses] == pytest.approx([row["loss"] for row in straight.losses], rel=1e-4)
    written = read_loss_log(resumed.run_dir / "loss.csv")
    assert [row["loss"] for row in written] == pytest.approx([row["loss"] for row in resumed.losses])
    expected, found = weights(straight.output), weights(resumed.output)
    assert expected.keys() == found.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(found[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
