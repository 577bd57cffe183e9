"""Which mode to run in (tiny or full), and a one-call report of the machine that every notebook prints first."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

import torch

MODE_VARIABLE = "DREAMBOOTH_MODE"
MODES = ("tiny", "full")


@dataclass(frozen=True)
class ModeChoice:
    """The chosen mode and the reason, so a notebook can say why it runs the way it does."""

    mode: str
    reason: str

    @property
    def is_tiny(self) -> bool:
        return self.mode == "tiny"


def select_mode() -> ModeChoice:
    """Choose `tiny` or `full`.

    The environment variable `DREAMBOOTH_MODE` wins when set; otherwise full mode on a CUDA machine (pretrained weights
    need a GPU to be useful) and tiny mode everywhere else (random tiny components, CPU, offline).
    """
    requested = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if requested:
        if requested not in MODES:
            raise ValueError(
                f"{MODE_VARIABLE}={os.environ[MODE_VARIABLE]!r} is not a mode: use one of {', '.join(MODES)}, "
                f"or unset it to choose automatically."
            )
        return ModeChoice(requested, f"{MODE_VARIABLE}={requested} is set")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        return ModeChoice("full", f"a CUDA GPU is available ({gpu}) and {MODE_VARIABLE} is unset")
    return ModeChoice("tiny", f"no CUDA GPU was found and {MODE_VARIABLE} is unset")


def default_device() -> torch.device:
    """CUDA when present, else Apple's MPS when present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Within the block, torch computes on one CPU thread; the thread count is restored afterwards.

    For tiny-mode work on a CPU (the demo, the toy model): its tensors are so small that a second thread only adds
    synchronisation, which costs seconds per step on a busy machine (the demo took 7.5 min with two threads on a loaded
    2-core box, 21 s with one). On a CUDA machine the CPU is not the worker, and nothing changes.
    """
    if torch.cuda.is_available():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB"
    if device.type == "mps":
        return "mps (Apple GPU, shares system memory)"
    cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        return f"cpu: {cores} cores, {memory:.1f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        return f"cpu: {cores} cores"


@dataclass(frozen=True)
class EnvironmentReport:
    """What a notebook prints first: mode and why, device and its memory, library versions."""

    mode: ModeChoice
    device: str
    versions: dict[str, str]

    def __str__(self) -> str:
        lines = [
            f"mode:         {self.mode.mode} ({self.mode.reason})",
            f"device:       {self.device}",
        ]
        lines += [f"{name + ':':<14}{version}" for name, version in self.versions.items()]
        return "\n".join(lines)


def environment_report() -> EnvironmentReport:
    """Collect the report; `print(environment_report())` shows it."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft"):
        versions[package] = _version(package)
    return EnvironmentReport(mode=select_mode(), device=_device_line(default_device()), versions=versions)


# Loggers of third-party packages whose warnings say nothing about how this package uses them: bitsandbytes' optional
# CPU 4-bit kernel (8-bit Adam here is CUDA only) and transformers' switch to its PIL image processors when torchvision
# is absent (evaluation hands it PIL images). Every command printed them before its own first line.
HARMLESS_WARNING_LOGGERS = ("bitsandbytes.backends.cpu.ops", "transformers.utils.import_utils")


def quiet_known_warnings() -> None:
    """Hide the warnings of `HARMLESS_WARNING_LOGGERS` (errors still show); call it before those packages load."""
    for name in HARMLESS_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
