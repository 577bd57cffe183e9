"""Interruptions the run folder must survive: a process killed while publishing an output, and a disk that fills up.

The kills are real: `DREAMBOOTH_TEST_KILL_WRITE=<name>[:<n>]` makes the atomic writer SIGKILL its process once that
output is complete in its temporary (`.<name>.tmp-<pid>-<hex>`), before the rename. The full disk is real too: a 4 MiB
tmpfs, filled while the run trains.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from tiny_runs import LORA_SETTINGS, Steps, assert_same_run, tiny_config, train_in_subprocess

import dreambooth_lib.train as train_module
from dreambooth_lib import cli
from dreambooth_lib.checkpoints import checkpoint_run, list_checkpoints
from dreambooth_lib.files import KILL_HOOK
from dreambooth_lib.losslog import read_loss_log
from dreambooth_lib.priors import class_image_name
from dreambooth_lib.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


FULL_SETTINGS = {**LORA_SETTINGS, "use_lora": False, "learning_rate": 1e-4}
PRIOR_SETTINGS = {**LORA_SETTINGS, "with_prior_preservation": True}
RUNS = {"lora": LORA_SETTINGS, "full": FULL_SETTINGS, "prior": PRIOR_SETTINGS}


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted runs, built on first use: {name: TrainResult}."""
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = train(tiny_config(tmp_path_factory.mktemp(name), **RUNS[name]))
        return done[name]

    return get


def hidden_temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob(".*.tmp-*")) if folder.is_dir() else []


# (run, the output the process dies publishing, the checkpoint the resumed run starts from, the steps it then trains)
KILLS = {
    "checkpoint": ("lora", "checkpoint-4", "checkpoint-2", [3, 4]),
    "loss log": ("lora", "loss.csv:3", "checkpoint-2", [3, 4]),  # 2: checkpoint-2's copy
    "lora files": ("lora", "pytorch_lora_weights.safetensors", "checkpoint-4", []),
    "pipeline folder": ("full", "pipeline", "checkpoint-4", []),
    "class image": ("prior", f"{class_image_name(1)}", None, [1, 2, 3, 4]),
}


@pytest.mark.parametrize("case", sorted(KILLS))
def test_a_kill_while_publishing_an_output_leaves_the_previous_state_and_resumes_to_the_same_end(
    case, straight_runs, tmp_path
):
    run, target, resume_point, remaining = KILLS[case]
    config = tiny_config(tmp_path, **RUNS[run])
    killed = train_in_subprocess(config, {KILL_HOOK: target}, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    # The output died whole in its hidden temporary; what readers see is the state before it.
    run_dir, checkpoints, class_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints", tmp_path
    name = target.partition(":")[0]
    holder = {"checkpoint": checkpoints, "class image": class_dir / "class_images"}.get(case, run_dir)
    assert [temporary.split(".tmp-")[0] for temporary in hidden_temporaries(holder)] == [f".{name}"]
    assert not (holder / name).exists() or name == "loss.csv"
    done = [checkpoint_run(path)["step"] for path in list_checkpoints(checkpoints)]
    assert done == {"checkpoint-2": [2], "checkpoint-4": [2, 4], None: []}[resume_point]
    if case == "loss log":  # the version written at step 2, whole
        assert [row["step"] for row in read_loss_log(run_dir / "loss.csv")] == [1, 2]

    steps = Steps()
    resumed = train(config.replace(resume_from="latest"), [steps])
    assert steps == remaining
    assert (resumed.resumed_from.name if resumed.resumed_from else None) == resume_point
    assert_same_run(resumed, straight_runs(run))
    assert hidden_temporaries(holder) == []  # the dead process's temporary was cleared


# --------------------------------------------------------------------------------------------------------------------
# A full disk: a 4 MiB tmpfs holds the run folder.


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 4 MiB tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; return it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:  # unbuffered: closing has nothing left to write
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    return filler


# (when the disk fills, whether the free-space check sees it coming or the write itself fails)
FULL_DISKS = [("checkpoint", True), ("checkpoint", False), ("final save", False)]


@pytest.mark.parametrize(("when", "checked"), FULL_DISKS, ids=["checkpoint-checked", "checkpoint-write", "final-save"])
def test_a_full_disk_stops_with_one_line_and_the_last_checkpoint_resumes(
    when, checked, small_disk, straight_runs, tmp_path, monkeypatch, capsys
):
    config = tiny_config(tmp_path, **LORA_SETTINGS, output_dir=str(small_disk / "run"))
    if not checked:  # the estimate passed, the write itself meets the full disk
        monkeypatch.setattr("dreambooth_lib.checkpoints.check_free_space", lambda *args: None)
    real_save, real_final = train_module.save_checkpoint, train_module._save

    def fill_then_checkpoint(accelerator, folder, step, *args):
        if step == 4:
            fill(small_disk)
        return real_save(accelerator, folder, step, *args)

    def fill_then_save(training):
        fill(small_disk)
        return real_final(training)

    if when == "checkpoint":
        monkeypatch.setattr(train_module, "save_checkpoint", fill_then_checkpoint)
    else:
        monkeypatch.setattr(train_module, "_save", fill_then_save)
    code = cli.main(["train", "--config", str(config.save(tmp_path / "settings.json"))])

    assert code == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err
    folder = small_disk / "run" / ("checkpoints" if when == "checkpoint" else "")
    assert line.startswith(f"error: not enough disk space in {str(folder).rstrip('/')} for "), line
    assert " are free" in line and ("it needs about" in line) == checked  # the check's figure, or the write's error
    run_dir = small_disk / "run"
    assert hidden_temporaries(run_dir) == hidden_temporaries(run_dir / "checkpoints") == []
    last = "checkpoint-2" if when == "checkpoint" else "checkpoint-4"
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == last

    monkeypatch.undo()
    (small_disk / "filler").unlink()
    steps = Steps()
    resumed = train(config.replace(resume_from="latest"), [steps])
    assert resumed.resumed_from.name == last and steps == ([3, 4] if when == "checkpoint" else [])
    assert_same_run(resumed, straight_runs("lora"))
