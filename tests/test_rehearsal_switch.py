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
