"""Writing outputs safely: each file or folder appears whole or not at all, and a big save first checks for room.

Every output of a run (the pipeline folder, LoRA files, loss.csv, class-image sidecars, checkpoints, the Drive copy)
is written under a temporary sibling name unique to the writing process, `.<name>.tmp-<pid>-<random>`, and renamed
into place only once complete. An interruption therefore leaves either the old output or the new one, plus at worst a
hidden temporary that `remove_stale_temporaries` clears on the next run. A disk that fills up mid-write is the same
case: the temporary is deleted, the old output stays, and `NoSpaceError` names the folder and the free space.

Test hook: with `DREAMBOOTH_TEST_KILL_WRITE=<name>` (or `<name>:<n>`) in the environment, the process SIGKILLs itself
when the first (n-th) output called `<name>` is complete in its temporary, just before the rename that publishes it:
what a power cut between writing and publishing leaves (tests/test_interruptions.py).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Room kept beyond a save's expected size: file-system overhead, metadata, a little growth.
SPACE_MARGIN = 1.1
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


KILL_HOOK = "DREAMBOOTH_TEST_KILL_WRITE"
_published: dict[str, int] = {}  # outputs published so far by this process, by name (for the test hook)


class NoSpaceError(OSError):
    """The disk holding an output lacks room for it; the message names the folder, the sizes and what to free."""


def _size(count: float) -> str:
    """Bytes for people: 812 KiB, 3.41 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _free(folder: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(folder)).free


def no_space_error(folder: str | os.PathLike, what: str, needed_bytes: int | None = None) -> NoSpaceError:
    """The error for a save of `what` into `folder` that does not fit: it names the folder, free space and fix."""
    folder = Path(folder)
    needs = f"it needs about {_size(needed_bytes)} and " if needed_bytes is not None else ""
    return NoSpaceError(
        f"not enough disk space in {folder} for {what}: {needs}{_size(_free(folder))} are free. Free some space (older "
        "run folders, or checkpoints_total_limit=1) and resume, or choose an output_dir on a bigger disk.",
    )


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain; torch.save reports it only as "file write failed" (a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "file write failed" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def undone_on_error(temporary: Path, what: str) -> Iterator[None]:
    """Delete `temporary` if the block fails, leaving the previous output as it was; a full disk raises NoSpaceError
    (naming `what`, the folder and its free space, measured once the temporary is gone) instead of the raw error."""
    try:
        yield
    except BaseException as error:
        remove(temporary)
        if isinstance(error, NoSpaceError) or not _is_disk_full(error):
            raise
        raise no_space_error(temporary.parent, what) from error


def _killed_by_test_hook(path: Path) -> None:
    """The test hook (module docstring): die without cleaning up once the chosen output is complete but unpublished."""
    wanted = os.environ.get(KILL_HOOK)
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name == path.name:
        _published[name] = _published.get(name, 0) + 1
        if _published[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def temporary_name(path: str | os.PathLike) -> Path:
    """A hidden sibling of `path` that no other process (or call) uses: `.<name>.tmp-<pid>-<random>`."""
    return _sibling(Path(path), "tmp")


def remove(path: Path) -> None:
    """Delete a file or a folder tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace(source: Path, target: Path) -> None:
    """Move `source` onto `target` (file or folder), replacing what was there.

    A file is replaced in one atomic rename. A folder cannot be renamed over a non-empty one, so the old folder is
    first renamed aside, the new one renamed in, and only then the old one deleted: between the two renames (a few
    microseconds) `target` is briefly absent, never half-written.
    """
    _killed_by_test_hook(target)
    if target.is_dir() and not target.is_symlink():
        aside = _sibling(target, "old")
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside)
    else:
        os.replace(source, target)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` to (a file, or a folder the caller creates); rename it into place on
    success. On an error the temporary is deleted and whatever was at `path` is left as it was.

        with atomic_output(run_dir / "loss.csv") as temporary:
            temporary.write_text(text)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    with undone_on_error(temporary, path.name):
        yield temporary
        replace(temporary, path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON, CSV) whole or not at all."""
    with atomic_output(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def copy_atomically(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a file or folder to `target`, which shows the complete copy or its earlier content, never a part."""
    source = Path(source)
    with atomic_output(target) as temporary:
        if source.is_dir():
            shutil.copytree(source, temporary)
        else:
            shutil.copyfile(source, temporary)
    return Path(target)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Clear what writers of this library left in `folder` when their process died mid-write; return what was removed.

    Only names of the form `.<name>.tmp-<pid>-<random>` or `.<name>.old-<pid>-<random>` whose pid no longer runs are
    touched: a half-written temporary is deleted; an old folder set aside by `replace` is put back when its new
    version never arrived, and deleted when it did. A live process's temporaries and every other file are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if not match or _pid_alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(path, target)
        else:
            remove(path)
            removed.append(path)
    return removed


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(folder: str | os.PathLike, needed_bytes: int, what: str) -> None:
    """Raise NoSpaceError unless the disk holding `folder` has room for `needed_bytes` (plus a 10% margin).

    `what` names the output in the message, e.g. "checkpoint-400".
    """
    if _free(Path(folder)) < needed_bytes * SPACE_MARGIN:
        raise no_space_error(folder, what, needed_bytes)
