"""Run one training process under the benchmarks' probe: the same probe for `train()` and the official scripts.

    python benchmarks/probe.py --result R.json [--card-gib N] -- path/to/train_dreambooth.py --its-arguments ...
    python benchmarks/probe.py --result R.json [--card-gib N] -- -m dreambooth_lib train --config run.json

The script runs unmodified, in this process (`runpy`), as its own `__main__`. Before it starts, the probe registers a
global optimizer-step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`: every optimiser, PyTorch's
or bitsandbytes', fires it once per real step; a step the fp16 gradient scaler skips does not), which takes a
timestamp after `torch.cuda.synchronize()`. When the script ends, however it ends, the probe writes JSON: the step
timestamps, the process's wall time, its peak memory (CUDA max allocated and reserved; on a CPU the max resident set,
labelled so) and the exit status.

`--card-gib N` (CUDA): the process may use at most N GiB of the card (`torch.cuda.set_per_process_memory_fraction`),
so a run that would not fit a card of N GiB fails here with "CUDA out of memory" even on a larger card.

`--profile-after K`: PyTorch's profiler records optimiser steps K+1..K+3 and the JSON gets its per-operator table
(self CUDA time first on a GPU): where one side spends a step that the other does not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

GIB = 2**30
PROFILED_STEPS = 3


def memory_fraction(card_gib: float, total_bytes: int) -> float:
    """The share of a card with `total_bytes` that leaves a process `card_gib` GiB, as PyTorch's allocator takes it."""
    if card_gib <= 0:
        raise ValueError(f"--card-gib must be positive, got {card_gib}")
    fraction = card_gib * GIB / total_bytes
    if fraction > 1:
        raise ValueError(f"--card-gib {card_gib} is more than this card's {total_bytes / GIB:.1f} GiB")
    return fraction


def peak_memory() -> dict:
    """The whole process's peak: CUDA max allocated / reserved on a GPU, else the max resident set (Linux: KiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "kind": "CUDA max allocated / reserved",
            "allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    return {"kind": "CPU max RSS", "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def torchvision_without_its_extension() -> None:
    """Let torchvision import beside a CPU-only PyTorch build (the official scripts import it for their transforms).

    PyPI's Linux torchvision wheels carry a CUDA-linked C++ extension that a CPU build of torch cannot load;
    torchvision then runs its pure-Python parts but still registers fake kernels for two of the extension's operators,
    which fails when they were never defined. Defining their schemas (no kernels: nothing here calls them) lets the
    import finish. Only on a machine without CUDA, and only when torchvision is there to import.
    """
    if torch.cuda.is_available() or importlib.util.find_spec("torchvision") is None:
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, name):
            library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    torchvision_without_its_extension.library = library  # keep the definitions alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--card-gib", type=float, help="the card size to run under (CUDA)")
    parser.add_argument("--profile-after", type=int, help="profile the 3 optimiser steps after this many")
    parser.add_argument("target", nargs=argparse.REMAINDER, help="-- SCRIPT.py ARGS... or -- -m MODULE ARGS...")
    args = parser.parse_args(argv)
    target = args.target[1:] if args.target[:1] == ["--"] else args.target
    if not target:
        parser.error("name the script (or -m MODULE) to run after --")

    started = time.perf_counter()
    report: dict = {"command": target, "card_gib": args.card_gib, "stamps": [], "exit": None}
    if args.card_gib is not None and torch.cuda.is_available():
        fraction = memory_fraction(args.card_gib, torch.cuda.get_device_properties(0).total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction)
        report["memory_fraction"] = fraction

    profiler = None

    def on_step(optimizer, *_):
        nonlocal profiler
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        report["stamps"].append(time.perf_counter() - started)
        done = len(report["stamps"])
        if done == args.profile_after:
            profiler = torch.profiler.profile()
            profiler.__enter__()
        elif profiler is not None and done == args.profile_after + PROFILED_STEPS:
            profiler.__exit__(None, None, None)
            order = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            report["profile"] = profiler.key_averages().table(sort_by=order, row_limit=30)
            profiler = None

    register_optimizer_step_post_hook(on_step)
    torchvision_without_its_extension()
    module = target[1] if target[0] == "-m" else None
    sys.argv = [module or target[0], *target[2 if module else 1 :]]
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, str(Path(target[0]).resolve().parent))  # as `python script.py` would
            runpy.run_path(target[0], run_name="__main__")
        report["exit"] = 0
    except SystemExit as stop:
        report["exit"] = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:  # noqa: BLE001 (an out-of-memory error is a result: record it, then re-raise)
        report["exit"], report["error"] = 1, f"{type(error).__name__}: {str(error)[:500]}"
        raise
    finally:
        report["seconds"] = time.perf_counter() - started
        report["peak"] = peak_memory()
        args.result.write_text(json.dumps(report, indent=1))
    return report["exit"]


if __name__ == "__main__":
    raise SystemExit(main())
