"""A run folder belongs to one run: its identity is recorded, a lock keeps a second live run out, and nothing of
another run is ever resumed, overwritten or pruned without being asked.

`run.json` holds the run's *fingerprint*: every setting that defines what is learned (model, prompts, method,
precision, ...) and the content of its data folders (file names, sizes, SHA-256). `max_steps`, the checkpoint cadence
and other settings that only say how long or how observably to train are left out, so a run can be extended. Training
into a folder whose fingerprint differs stops before any work, naming the settings that differ; `overwrite=True`
removes that run's own files first (never other files). `run.json` also holds a `run_id`, new for every fresh start:
checkpoints carry it, so `resume_from='latest'` and pruning see this run's checkpoints only.

With `mirror_dir` (Colab: a Google Drive folder), the run folder lives on the fast local disk and the mirror holds a
copy of the identity, the loss log, the latest checkpoint and the final outputs; a new runtime resumes from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dreambooth_lib.files import (
    check_free_space,
    copy_atomically,
    remove,
    remove_stale_temporaries,
    write_text_atomically,
)
from dreambooth_lib.priors import CLASS_IMAGE_PREFIX

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
CHECKPOINTS = "checkpoints"
# What a run writes at the top of its folder (class_images/ is not listed: its images carry their own provenance).
RUN_OUTPUTS = (
    "config.json",
    "loss.csv",
    "loss.png",
    "samples.png",
    "README.md",
    "pipeline",
    "pytorch_lora_weights.safetensors",
    "lora_kohya.safetensors",
)
_VALIDATION = re.compile(r"^validation-\d+\.png$")
_CHECKPOINT = re.compile(r"^checkpoint-\d+$")
_GENERATED_CLASS_FILE = re.compile(rf"^{CLASS_IMAGE_PREFIX}\d+\.(png|json)$")
# Settings that say how long, how often or how fast to train, where to write, or what to show: a run may change them
# between its sessions. Every other setting, including ones added later, defines the run.
NOT_IDENTITY = frozenset(
    {
        "max_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from",
        "overwrite",
        "output_dir",
        "mirror_dir",
        "max_nonfinite_steps",
        "instance_dir",  # the folders' content counts, not where they are
        "class_dir",
        "class_batch_size",
        "gradient_checkpointing",
        "attention",
        "cache_latents",
        "validation_steps",
        "validation_prompts",
        "num_validation_images",
        "validation_inference_steps",
        "guidance_scale",
    }
)


class RunError(RuntimeError):
    """A run cannot go on as asked; the message names the folder or setting and the ways out."""


class RunFolderError(RunError):
    """The run folder holds another run (or an unrecorded one)."""


class RunLockedError(RunError):
    """Another live run holds the folder's lock."""


# --------------------------------------------------------------------------------------------------------------------
# Identity


def _file_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def folder_contents(folder: str | os.PathLike | None, skip: re.Pattern | None = None) -> dict[str, str]:
    """`{name: "<size> <sha256>"}` of the visible files directly in `folder` ({} when it does not exist)."""
    if folder is None or not Path(folder).is_dir():
        return {}
    contents = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not path.name.startswith(".") and not (skip and skip.match(path.name)):
            contents[path.name] = f"{path.stat().st_size} {_file_digest(path)}"
    return contents


def fingerprint(config) -> dict:
    """What defines the run `config` describes: its identity settings and its data folders' files.

    Class images this library generated are left out (their sidecars record prompt, model and resolution, which are
    checked on their own); images a user put in the class folder count.
    """
    values = {name: value for name, value in config.to_dict().items() if name not in NOT_IDENTITY}
    values["instance_dir files"] = folder_contents(config.instance_dir)
    if config.with_prior_preservation:
        class_dir = config.class_dir or Path(config.output_dir) / "class_images"
        values["class_dir files"] = folder_contents(class_dir, skip=_GENERATED_CLASS_FILE)
    return values


def _digest(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _short(value) -> str:
    text = repr(value) if not isinstance(value, dict) else f"{len(value)} files"
    return text if len(text) <= 48 else text[:45] + "..."


def differences(recorded: dict, wanted: dict) -> list[str]:
    """Each setting whose value differs, as `name (then X, now Y)`; for folders, which files differ."""
    found = []
    for name in sorted(set(recorded) | set(wanted)):
        then, now = recorded.get(name), wanted.get(name)
        if then == now:
            continue
        if isinstance(then, dict) and isinstance(now, dict):
            changed = sorted(key for key in set(then) | set(now) if then.get(key) != now.get(key))
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            found.append(f"{name} ({shown} differ)")
        else:
            found.append(f"{name} (then {_short(then)}, now {_short(now)})")
    return found


@dataclass
class RunRecord:
    """The content of run.json."""

    run_id: str
    digest: str
    fingerprint: dict
    started: str

    @classmethod
    def new(cls, values: dict) -> RunRecord:
        return cls(secrets.token_hex(6), _digest(values), values, time.strftime("%Y-%m-%d %H:%M:%S"))

    @classmethod
    def read(cls, folder: str | os.PathLike | None) -> RunRecord | None:
        path = Path(folder) / RUN_FILE if folder else None
        if path is None or not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as error:
            raise RunFolderError(
                f"{path} is unreadable ({error}): train into a new output_dir, or pass overwrite=True to remove "
                "that run's files."
            ) from error

    def write(self, folder: str | os.PathLike) -> None:
        write_text_atomically(Path(folder) / RUN_FILE, json.dumps(dataclasses.asdict(self), indent=1) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Lock: a kernel lock on run.lock, released by the operating system when the process ends however it ends (a crash,
# SIGKILL, a Colab disconnect), so a dead run never keeps the folder.


def _try_lock(descriptor: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class RunLock:
    """Holds `folder/run.lock` while a run writes to `folder`; a second `acquire` (any process) raises
    RunLockedError."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.descriptor: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(descriptor):
            os.close(descriptor)
            try:
                holder = self.path.read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise RunLockedError(
                f"{self.path.parent} is in use by a live run ({holder}): wait for it to end, or train into another "
                "output_dir."
            )
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}".encode())
        self.descriptor = descriptor
        return self

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing drops the lock; the file stays for the next run to lock
            self.descriptor = None


# --------------------------------------------------------------------------------------------------------------------
# The run folder


def run_files(folder: str | os.PathLike) -> list[Path]:
    """What a run wrote in `folder`: its record, outputs, validation images and checkpoints (not class images)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [folder / name for name in (RUN_FILE, *RUN_OUTPUTS) if (folder / name).exists()]
    found += sorted(path for path in folder.iterdir() if _VALIDATION.match(path.name))
    checkpoints = folder / CHECKPOINTS
    if checkpoints.is_dir():
        found += sorted(path for path in checkpoints.iterdir() if _CHECKPOINT.match(path.name))
    return found


def remove_run(folder: str | os.PathLike) -> list[Path]:
    """Delete the files a run wrote in `folder` (`run_files`), and nothing else; return what was deleted."""
    removed = run_files(folder)
    for path in removed:
        remove(path)
    checkpoints = Path(folder) / CHECKPOINTS
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    return removed


def _ways_out(folder: Path) -> str:
    return f"Train into a new output_dir, or pass overwrite=True to remove the files of the run in {folder} first."


def _check_folder(folder: Path, recorded: RunRecord | None, wanted: dict) -> None:
    if recorded is None:
        leftovers = run_files(folder)
        if leftovers:
            names = ", ".join(path.name for path in leftovers[:4])
            raise RunFolderError(
                f"{folder} holds the files of a run whose settings were not recorded ({names}). {_ways_out(folder)}"
            )
        return
    if recorded.fingerprint != wanted:
        changed = "; ".join(differences(recorded.fingerprint, wanted))
        raise RunFolderError(f"{folder} holds another run, whose settings differ: {changed}. {_ways_out(folder)}")


def _check_not_started(folder: Path) -> None:
    """A fresh start must not write over the results or checkpoints of the same run trained earlier."""
    done = [path.name for path in run_files(folder) if path.name not in (RUN_FILE, "config.json")]
    if done:
        raise RunFolderError(
            f"{folder} already holds this run ({', '.join(done[:4])}): resume_from='latest' continues it (raise "
            "max_steps to train it further), overwrite=True starts it again, or train into a new output_dir."
        )


def _restore_from_mirror(run_dir: Path, mirror: Path) -> None:
    """A fresh runtime: bring back the run's record and loss log from the mirror; its checkpoints are read there."""
    for name in (RUN_FILE, "config.json", "loss.csv"):
        if (mirror / name).is_file() and not (run_dir / name).exists():
            copy_atomically(mirror / name, run_dir / name)


def _start(config, run_dir: Path, mirror: Path | None) -> RunRecord:
    """Check the folder (and the mirror) against the run and record it; return the record in force."""
    for folder in (run_dir, mirror):
        if folder is not None:
            remove_stale_temporaries(folder)
            remove_stale_temporaries(folder / CHECKPOINTS)
    if config.overwrite:
        for folder in (run_dir, mirror):
            if folder is not None:
                remove_run(folder)
    wanted = fingerprint(config)
    if mirror is not None:
        _check_folder(mirror, RunRecord.read(mirror), wanted)
        _restore_from_mirror(run_dir, mirror)
    recorded = RunRecord.read(run_dir)
    _check_folder(run_dir, recorded, wanted)
    if config.resume_from is None:
        for folder in (run_dir, mirror):
            if folder is not None:
                _check_not_started(folder)
    # Resuming continues the recorded run; anything else is a fresh start with a new id, whose checkpoints are its own.
    continues = recorded is not None and config.resume_from == "latest"
    record = recorded if continues else RunRecord.new(wanted)
    for folder in (run_dir, mirror):
        if folder is not None:
            record.write(folder)
            write_text_atomically(folder / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    return record


def mirror_outputs(run_dir: str | os.PathLike, mirror: str | os.PathLike) -> None:
    """Copy a finished run's outputs (model, loss log and curve, samples, model card) to the mirror, each atomically."""
    run_dir, mirror = Path(run_dir), Path(mirror)
    for name in RUN_OUTPUTS:
        if (run_dir / name).exists():
            size = sum(path.stat().st_size for path in [run_dir / name, *(run_dir / name).rglob("*")] if path.is_file())
            check_free_space(mirror, size, f"the copy of {name}")
            copy_atomically(run_dir / name, mirror / name)


@contextmanager
def claim(config, main: bool = True) -> Iterator[RunRecord | None]:
    """Lock `config.output_dir`, check it holds this run (or nothing), record the run; release the lock at the end.

    Only the main process (`main`) checks and writes; the others get None and read run.json once the main one is done.
    Raises RunLockedError or RunFolderError before anything is changed.
    """
    if not main:
        yield None
        return
    run_dir = Path(config.output_dir)
    lock = RunLock(run_dir).acquire()
    try:
        mirror = Path(config.mirror_dir) if config.mirror_dir else None
        yield _start(config, run_dir, mirror)
    finally:
        lock.release()
