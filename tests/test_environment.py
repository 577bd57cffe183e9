"""Mode selection: the environment variable wins; else full on CUDA, tiny elsewhere."""

import pytest
import torch

from dreambooth_lib.environment import environment_report, select_mode


@pytest.mark.parametrize("value", ["tiny", "full", " FULL "])
def test_environment_variable_wins(monkeypatch, value):
    monkeypatch.setenv("DREAMBOOTH_MODE", value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: value.strip().lower() != "full")
    choice = select_mode()
    assert choice.mode == value.strip().lower()
    assert "DREAMBOOTH_MODE" in choice.reason


def test_full_on_cuda_tiny_elsewhere(monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_MODE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_mode().mode == "tiny"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4")
    choice = select_mode()
    assert choice.mode == "full" and "Tesla T4" in choice.reason


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODE", "huge")
    with pytest.raises(ValueError, match="DREAMBOOTH_MODE='huge'.*tiny, full"):
        select_mode()


def test_report_names_mode_device_and_versions(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_MODE", "tiny")
    text = str(environment_report())
    for needle in ("mode:", "tiny", "device:", "cpu", "torch:", "diffusers:", "transformers:"):
        assert needle in text
