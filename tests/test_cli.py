"""The command line's main jobs, run in-process in tiny mode; a user's mistake ends in one line and exit code 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_lib.cli import main
from dreambooth_lib.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["generate", "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 64 + 2, 64)
    assert "mode:" in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_missing_photo_folder_is_one_line_naming_the_setting(tmp_path, capsys):
    missing = tmp_path / "my-photos"
    assert main(["train", "--set", f"instance_dir={missing}", f"output_dir={tmp_path / 'run'}"]) == 2
    assert _one_error_line(capsys) == f"error: instance_dir: {missing} does not exist: check the path (or create it)"


def test_a_run_folder_given_to_generate_points_to_its_pipeline(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "model_index.json").write_text("{}")
    assert main(["generate", "--prompt", "a dog", "--model", str(run), "--out", str(tmp_path / "x.png")]) == 2
    assert f"pass the pipeline inside it, {run / 'pipeline'}" in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is an fp16 preset on a machine without CUDA")
def test_an_fp16_preset_on_a_cpu_says_which_setting_to_change(tmp_path, capsys):
    assert main(["train", "--preset", "sd15-full-t4", "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    line = _one_error_line(capsys)
    assert "mixed_precision='fp16' needs a CUDA GPU" in line and "use 'no'" in line


def test_a_bad_setting_is_one_line(capsys):
    assert main(["train", "--set", "max_stepz=3"]) == 2
    assert _one_error_line(capsys) == "error: unknown setting 'max_stepz'. Did you mean 'max_steps'?"


def test_train_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for name in PRESETS:
        assert name in text, name


def test_commands_do_not_print_third_party_import_warnings(tmp_path):
    command = [sys.executable, "-m", "dreambooth_lib", "generate", "--prompt", "a dog", "--num-images", "1"]
    command += ["--steps", "1", "--out", str(tmp_path / "grid.png")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBOOTH_MODE": "tiny", "PYTHONPATH": str(ROOT)}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    for noise in ("kernels-community", "requires torchvision"):
        assert noise not in finished.stderr, finished.stderr
