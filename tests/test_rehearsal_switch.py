"""The rehearsal switch (DREAMBOOTH_REHEARSAL): off unless asked, one visible line, counts and CPU settings shrunk."""

import pytest
import torch

from dreambooth_lib import notebook
from dreambooth_lib.config import TrainConfig
from dreambooth_lib.notebook import REHEARSAL_COUNT, notebook_setup


@pytest.fixture
def full_mode(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODE", "full")
    monkeypatch.delenv("DREAMBOOTH_REHEARSAL", raising=False)


def test_no_rehearsal_unless_asked(full_mode, capsys):
    setup = notebook_setup()
    assert setup.rehearsal is None and setup.run_settings() == {} and setup.count(30) == 30
    assert "rehearsal" not in capsys.readouterr().out


def test_cpu_rehearsal_says_what_changed_and_shrinks_counts(full_mode, monkeypatch, capsys):
    monkeypatch.setenv("DREAMBOOTH_REHEARSAL", "cpu")
    setup = notebook_setup()
    printed = capsys.readouterr().out
    assert "mode:         full" in printed
    assert [line for line in printed.splitlines() if line.startswith("rehearsal:")], printed
    assert setup.count(30) == REHEARSAL_COUNT and setup.count(1) == 1
    config = TrainConfig.preset("sdxl-lora-t4", **setup.run_settings())  # every setting is a real field
    assert (config.max_steps, config.mixed_precision, config.use_8bit_adam) == (2, "no", False)
    assert setup.dtype == (torch.float16 if setup.device.type == "cuda" else torch.float32)


def test_an_unknown_rehearsal_is_refused(full_mode, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_REHEARSAL", "yes")
    with pytest.raises(ValueError, match="DREAMBOOTH_REHEARSAL"):
        notebook.rehearsal_requested()


def test_a_run_trained_further_before_resumes_where_it_stands(full_mode, tmp_path):
    """Notebook 05 run again after its "train longer" cell: the run's checkpoint is beyond the notebook's max_steps;
    the set-up raises max_steps to it (train() refused: "at step 4, beyond max_steps=2")."""
    setup = notebook_setup()
    local, drive = tmp_path / "local", tmp_path / "drive"
    (drive / "checkpoints" / "checkpoint-4").mkdir(parents=True)  # a new runtime: only the Drive mirror has it
    config = TrainConfig.preset("tiny-cpu", max_steps=2, output_dir=str(local), mirror_dir=str(drive))
    assert setup.resumed(config.replace(resume_from="latest")).max_steps == 4
    assert setup.resumed(config.replace(resume_from=None)).max_steps == 2  # a fresh start is left as asked
    assert setup.resumed(config.replace(resume_from="latest", max_steps=6)).max_steps == 6
