"""Run folders: identity, overwrite, lock, mirror; atomic files; the loss log; pruning. No model is trained here (the
end-to-end faults are reproduced in test_train.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_lib import files, runs
from dreambooth_lib.checkpoints import MARKER, latest_checkpoint, list_checkpoints, prune, resolve_resume
from dreambooth_lib.config import PRESETS, TrainConfig
from dreambooth_lib.losslog import LossLogError, NonFiniteLossError, NonFiniteWatch, read_loss_log, write_loss_log
from dreambooth_lib.modelcard import write_model_card

ROOT = Path(__file__).resolve().parent.parent
DOG = ROOT / "data" / "subjects" / "dog"


def config_in(tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(instance_dir=str(DOG), output_dir=str(tmp_path / "run"), class_dir=str(tmp_path / "class"))
    return TrainConfig.preset("tiny-cpu", **{**settings, **overrides})


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def claim(config) -> runs.RunRecord:
    with runs.claim(config) as record:
        return record


# --------------------------------------------------------------------------------------------------------------------
# Identity


def test_fingerprint_leaves_out_length_and_cadence_but_not_what_is_learned(tmp_path):
    base = config_in(tmp_path)
    same = base.replace(max_steps=999, checkpointing_steps=7, resume_from="latest", output_dir=str(tmp_path / "b"))
    assert runs.fingerprint(base) == runs.fingerprint(same)
    for change in ({"learning_rate": 1e-4}, {"instance_prompt": "a photo of sks cat"}, {"mixed_precision": "bf16"}):
        assert runs.fingerprint(base) != runs.fingerprint(base.replace(**change)), change
    # The data folder counts by content: one byte changed in one photo is another run.
    photos = tmp_path / "photos"
    shutil.copytree(DOG, photos)
    moved = base.replace(instance_dir=str(photos))
    assert runs.fingerprint(moved) == runs.fingerprint(base)  # a copy elsewhere is the same data
    first = sorted(photos.iterdir())[0]
    first.write_bytes(first.read_bytes()[:-1] + b"\0")
    assert runs.differences(runs.fingerprint(base), runs.fingerprint(moved)) == [
        f"instance_dir files ({first.name} differ)"
    ]


def test_another_subject_in_a_used_folder_stops_before_any_work(tmp_path):
    first = config_in(tmp_path)
    record = claim(first)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["run_id"] == record.run_id
    assert claim(first.replace(resume_from="latest", max_steps=300)).run_id == record.run_id  # extending: same run
    cat = tmp_path / "cat"
    cat.mkdir()
    shutil.copy(sorted(DOG.iterdir())[0], cat / "cat.jpg")
    second = first.replace(instance_dir=str(cat), instance_prompt="a photo of sks cat", resume_from="latest")
    with pytest.raises(runs.RunFolderError) as caught:
        claim(second)
    message = str(caught.value)
    for expected in (
        str(tmp_path / "run"),
        "instance_prompt",
        "instance_dir files",
        "new output_dir",
        "overwrite=True",
    ):
        assert expected in message, expected
    assert TrainConfig.from_file(tmp_path / "run" / "config.json") == first.replace(resume_from="latest", max_steps=300)


def test_overwrite_removes_only_the_old_runs_files(tmp_path):
    first = config_in(tmp_path)
    claim(first)
    run = tmp_path / "run"
    for name in ("loss.csv", "validation-10.png", "pytorch_lora_weights.safetensors", "my-notes.txt"):
        (run / name).write_text("x")
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "pipeline").mkdir()
    (run / "class_images").mkdir()
    other = first.replace(learning_rate=1e-4)
    with pytest.raises(runs.RunFolderError, match="learning_rate"):
        claim(other)
    claim(other.replace(overwrite=True))
    assert sorted(path.name for path in run.iterdir()) == [
        "class_images", "config.json", "my-notes.txt", "run.json", "run.lock"
    ]  # fmt: skip
    assert runs.RunRecord.read(run).fingerprint["learning_rate"] == 1e-4


def test_an_unrecorded_run_is_not_written_over(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-800").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(runs.RunFolderError, match="not recorded"):
        claim(config_in(tmp_path))


def test_a_second_live_run_is_locked_out_and_a_dead_ones_lock_is_free(tmp_path):
    config = config_in(tmp_path)
    with runs.claim(config), pytest.raises(runs.RunLockedError, match=f"pid {os.getpid()}"):
        claim(config)
    claim(config)  # released at the end
    # A process killed while holding the lock: the kernel drops it, no clean-up needed.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from dreambooth_lib.runs import RunLock; RunLock({str(tmp_path / 'run')!r})"
         ".acquire(); print('locked', flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunLockedError, match=f"pid {holder.pid}"):
            claim(config)
    finally:  # also when an assertion failed: no holder outlives the test
        holder.kill()
        holder.wait()
    claim(config)


def test_a_new_runtime_resumes_the_mirrored_run(tmp_path):
    config = config_in(tmp_path, mirror_dir=str(tmp_path / "drive"))
    record = claim(config)
    (tmp_path / "drive" / "loss.csv").write_text("step,loss\n1,0.5\n")
    shutil.rmtree(tmp_path / "run")  # the runtime's local disk is gone
    again = claim(config.replace(resume_from="latest"))
    assert again.run_id == record.run_id
    assert (tmp_path / "run" / "loss.csv").read_text() == "step,loss\n1,0.5\n"
    with pytest.raises(runs.RunFolderError, match=str(tmp_path / "drive")):
        claim(config.replace(output_dir=str(tmp_path / "elsewhere"), seed=1))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints of this run only


def make_checkpoint(folder: Path, step: int, run_id: str) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / MARKER).write_text(json.dumps({"run_id": run_id, "digest": "d", "step": step}))
    return path


def test_pruning_and_latest_see_only_this_runs_checkpoints_below_the_step(tmp_path):
    for step in (600, 800):
        make_checkpoint(tmp_path, step, "older-longer-run")
    for step in (100, 200, 300):
        make_checkpoint(tmp_path, step, "this")
    assert prune(tmp_path, "this", 300, keep=2) == [tmp_path / "checkpoint-100"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-200", "checkpoint-300", "checkpoint-600", "checkpoint-800"
    ]  # fmt: skip
    assert latest_checkpoint(tmp_path, "this").name == "checkpoint-300"
    assert resolve_resume("latest", [tmp_path / "empty", tmp_path], "this").name == "checkpoint-300"
    with pytest.raises(runs.RunFolderError, match="another run"):
        resolve_resume(str(tmp_path / "checkpoint-800"), tmp_path, "this", digest="other")


# --------------------------------------------------------------------------------------------------------------------
# Atomic files


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), files.atomic_output(target) as temporary:
        temporary.mkdir()
        (temporary / "weights").write_text("half")
        raise RuntimeError("disconnected")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert (target / "weights").read_text() == "old"
    with files.atomic_output(target) as temporary:
        assert temporary.name.startswith(f".pipeline.tmp-{os.getpid()}-")
        temporary.mkdir()
        (temporary / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]
    assert (target / "weights").read_text() == "new"
    assert files.temporary_name(target) != files.temporary_name(target)


def test_stale_temporaries_of_dead_writers_are_cleared_and_a_set_aside_folder_comes_back(tmp_path):
    dead = dead_pid()
    (tmp_path / f".loss.csv.tmp-{dead}-0123abcd").write_text("half")
    (tmp_path / f".pipeline.old-{dead}-0123abcd").mkdir()  # died between the two renames of `replace`
    live = tmp_path / f".samples.png.tmp-{os.getppid()}-0123abcd"
    live.write_text("being written")
    (tmp_path / ".hidden-notes").write_text("mine")
    files.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-notes", live.name, "pipeline"]


def test_free_space_is_checked_before_a_save(tmp_path):
    files.check_free_space(tmp_path / "not-yet", 1024, "checkpoint-1")
    with pytest.raises(files.NoSpaceError, match=rf"{tmp_path}.*checkpoint-200: it needs about 1048576\.00 GiB"):
        files.check_free_space(tmp_path, 1024**5, "checkpoint-200")


# --------------------------------------------------------------------------------------------------------------------
# Loss log


def rows(count: int) -> list[dict]:
    return [
        {"step": i, "loss": 0.5 / i, "instance_loss": 0.3 / i, "prior_loss": 0.2 / i, "lr": 1e-3, "skipped": 0}
        for i in range(1, count + 1)
    ]


def assert_rows(found: list[dict], expected: list[dict]) -> None:
    assert len(found) == len(expected)
    for row, wanted in zip(found, expected, strict=True):
        assert row == pytest.approx(wanted)


def test_loss_log_survives_a_torn_last_line_and_names_the_file_otherwise(tmp_path):
    path = write_loss_log(tmp_path / "loss.csv", rows(4))
    assert_rows(read_loss_log(path), rows(4))
    assert_rows(read_loss_log(path, up_to=2), rows(2))
    text = path.read_text()
    path.write_text(text[: text.rindex("\n", 0, -1) + 9])  # the last row cut mid-number
    assert_rows(read_loss_log(path), rows(3))
    path.write_text(text[: text.rindex("\n", 0, -1) + 3])  # cut after "4,": a row with missing cells
    assert_rows(read_loss_log(path), rows(3))
    lines = text.splitlines()
    lines[2] = "2,0.2"  # a broken row in the middle is not a crash's doing: say where
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LossLogError, match=rf"{path} line 3"):
        read_loss_log(path)
    path.write_text("step,loss,instance_loss,prior_loss,lr\n1,0.5,0.3,0.2,0.001\n")  # before the skipped column
    assert read_loss_log(path)[0]["skipped"] == 0


def test_non_finite_watch_stops_after_the_set_number_of_steps_in_a_row(tmp_path):
    config = config_in(tmp_path, max_nonfinite_steps=2, learning_rate=10.0)
    watch = NonFiniteWatch(config)
    bad = {"step": 5, "loss": float("nan"), "instance_loss": float("nan"), "prior_loss": 0.1, "lr": 10.0}
    watch.check(bad)
    assert watch.failing
    watch.check(rows(1)[0])  # a finite step ends the streak
    assert not watch.failing
    watch.check(bad)
    with pytest.raises(NonFiniteLossError) as caught:
        watch.check({**bad, "step": 6})
    message = str(caught.value)
    for expected in ("step 6", "instance_loss=nan", "learning_rate=10.0", "mixed_precision='no'", "Nothing new"):
        assert expected in message, expected
    assert "prior_loss" not in message  # the finite part is not blamed


def test_the_model_card_counts_the_steps_the_fp16_scaler_skipped(tmp_path):
    config = config_in(tmp_path, mixed_precision="fp16")
    logged = rows(5)
    logged[0]["skipped"] = logged[1]["skipped"] = 1  # the scaler's first steps, while it finds its scale
    assert "The fp16 gradient scaler skipped 2 of them" in write_model_card(config, tmp_path, "sd", logged).read_text()
    assert "scaler" not in write_model_card(config, tmp_path, "sd", rows(5)).read_text()


def test_every_preset_checkpoints_every_100_to_250_steps():
    for name, preset in PRESETS.items():
        assert 100 <= preset.checkpointing_steps <= 250, name
    assert 100 <= TrainConfig().checkpointing_steps <= 250  # the defaults too
