"""The notebooks' shared set-up: where sample data and run folders come from, and that tiny runs never touch Drive."""

import tempfile
from pathlib import Path

import pytest
import torch

from dreambooth_lib import assets, notebook
from dreambooth_lib.environment import EnvironmentReport, ModeChoice


def make_setup(mode: str, colab: bool) -> notebook.NotebookSetup:
    report = EnvironmentReport(mode=ModeChoice(mode, "test"), device="cpu", versions={})
    return notebook.NotebookSetup(report=report, device=torch.device("cpu"), colab=colab)


@pytest.fixture
def drive(tmp_path, monkeypatch) -> list[str]:
    """A pretend Google Drive under tmp_path; the list records every mount."""
    mounts: list[str] = []
    monkeypatch.setattr(notebook, "DRIVE_RUNS", tmp_path / "drive" / "MyDrive" / "dreambooth-course")
    monkeypatch.setattr(notebook, "mount_drive", lambda: mounts.append("mounted"))
    return mounts


def test_tiny_runs_get_a_fresh_folder_and_never_touch_drive(drive, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    setup = make_setup("tiny", colab=True)  # a Colab runtime without a GPU
    first, second = setup.run_dir("05-sd15-dog"), setup.run_dir("05-sd15-dog")
    assert first != second and first.is_dir() and not any(first.iterdir())
    assert first.parent == tmp_path
    assert drive == [] and not notebook.DRIVE_RUNS.exists()
    assert setup.run_settings()["max_steps"] == notebook.TINY_RUN_SETTINGS["max_steps"]


def earlier_run(folder: Path) -> dict[str, bytes]:
    """A run folder as a disconnected runtime left it: a checkpoint with weights, a loss log. Returns its files."""
    (folder / "checkpoints" / "checkpoint-200").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-200" / "model.safetensors").write_bytes(b"weights of step 200")
    (folder / "loss.csv").write_text("step,loss\n1,0.1\n")
    return files_in(folder)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("colab", [True, False], ids=["colab-drive", "local-outputs"])
def test_full_runs_find_the_earlier_run_again_and_keep_what_is_there(drive, tmp_path, monkeypatch, colab):
    monkeypatch.setattr(notebook, "LOCAL_RUNS", tmp_path / "outputs")
    folder = (notebook.DRIVE_RUNS if colab else notebook.LOCAL_RUNS) / "05-sd15-dog"
    before = earlier_run(folder)
    setup = make_setup("full", colab=colab)
    assert setup.run_dir("05-sd15-dog") == folder
    setup.training_folders(folder)
    assert drive == (["mounted"] if colab else [])
    assert files_in(folder) == before  # found again to resume, never cleared
    assert setup.run_settings() == {}


def test_full_runs_on_colab_train_on_local_disk_and_mirror_to_drive(drive, tmp_path):
    setup = make_setup("full", colab=True)
    folders = setup.training_folders(setup.run_dir("06-sdxl-lora-dog") / "sdxl")
    assert folders == {
        "output_dir": "/content/runs/06-sdxl-lora-dog/sdxl",
        "mirror_dir": str(notebook.DRIVE_RUNS / "06-sdxl-lora-dog" / "sdxl"),
    }
    tiny = make_setup("tiny", colab=True)
    run_dir = tmp_path / "tiny-run"
    assert tiny.training_folders(run_dir) == {"output_dir": str(run_dir), "mirror_dir": None}  # never Drive


def test_full_runs_elsewhere_go_to_outputs(drive):
    assert make_setup("full", colab=False).run_dir("07-teal-room") == Path("outputs") / "07-teal-room"
    assert drive == []


def test_sample_data_is_found_where_a_wheel_puts_it(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "dreambooth_lib"
    (package / "sample_data" / "subjects" / "dog").mkdir(parents=True)
    monkeypatch.setattr(assets, "_PACKAGE", package)
    assert assets.data_path("subjects", "dog") == package / "sample_data" / "subjects" / "dog"


def test_sample_data_comes_from_the_checkout_in_an_editable_install():
    assert assets.data_dir() == Path(__file__).resolve().parent.parent / "data"
    assert (assets.data_path("clip-tokenizer") / "vocab.json").is_file()


def test_a_missing_sample_says_what_is_there():
    with pytest.raises(FileNotFoundError, match=r"subjects/cat \(there: .*dog.*teapot"):
        assets.data_path("subjects", "cat")


def test_a_package_without_its_data_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_PACKAGE", tmp_path / "dreambooth_lib")
    with pytest.raises(FileNotFoundError, match="Reinstall the package"):
        assets.data_dir()
