"""Training speed and peak memory: `dreambooth_lib.train` against the usual scripts' loop, same model and settings.

    python benchmarks/train_speed.py            # the tiny model on this CPU (about a minute)
    python benchmarks/train_speed.py --gpu      # full-size SD 1.5 and SDXL architectures on a CUDA GPU (~8 minutes)
    python benchmarks/train_speed.py --dry-run  # the GPU cases' settings on tiny components, on a CPU

For each case both loops train the same preset's settings for `warmup + steps` optimiser steps, each in a fresh
process: ours is `train()` itself, timed by a callback; the reference is `reference_loop.train_reference`. The figure
is the median seconds per optimiser step after the warm-up steps, and the peak memory of the process (CUDA max
allocated on a GPU, max resident set on a CPU). The ratio ours/reference below 1 means ours is faster or lighter.

The GPU cases need no download: the SD 1.5 and SDXL architectures are built from their configs with random weights
and saved once as local diffusers folders (timing and memory do not depend on the weights' values). The instance
images are the sample dog; the teapot photos stand in for class images, so no class images are generated here
(`class_images.py` measures that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the benchmarks folder is not a package: each script runs by its path)

from dreambooth_lib.config import PRESETS, TrainConfig  # noqa: E402
from dreambooth_lib.memory import estimate_memory_gib  # noqa: E402
from dreambooth_lib.models import resolve_kind  # noqa: E402

INSTANCE_DIR = common.REPO / "data" / "subjects" / "dog"
CLASS_DIR = common.REPO / "data" / "subjects" / "teapot"


@dataclass(frozen=True)
class Case:
    """One measured setting: a preset, and how many optimiser steps to warm up and to time."""

    preset: str
    warmup: int
    steps: int


CPU_CASES = [Case("tiny-cpu", warmup=5, steps=50)]
# SDXL's presets accumulate 4 batches per optimiser step, so 12 steps are 48 UNet passes.
GPU_CASES = [
    Case("sd15-full-t4", warmup=3, steps=30),
    Case("sd15-full-fast", warmup=3, steps=30),
    Case("sd15-lora", warmup=3, steps=30),
    Case("sdxl-lora-t4", warmup=2, steps=12),
    Case("sdxl-lora-fast", warmup=2, steps=12),
]


# The presets meant for a 15 GiB T4, and the peak they must stay under (the CUDA context and fragmentation take the
# rest of the card).
T4_PRESETS = ("sd15-full-t4", "sd15-lora", "sdxl-lora-t4")
T4_BUDGET_GIB = 14.0
# The settings that decide speed and memory, copied into the results next to the figures.
REPORTED_SETTINGS = [
    "model",
    "kind",
    "resolution",
    "train_batch_size",
    "gradient_accumulation_steps",
    "with_prior_preservation",
    "train_text_encoder",
    "use_lora",
    "lora_rank",
    "mixed_precision",
    "use_8bit_adam",
    "gradient_checkpointing",
    "cache_latents",
]


def bench_config(case: Case, model: str, output_dir: Path, *, dry_run: bool = False) -> TrainConfig:
    """The case's preset on `model`, run for warmup + steps, with nothing slow after the loop."""
    config = PRESETS[case.preset].replace(
        model=model,
        instance_dir=str(INSTANCE_DIR),
        class_dir=str(CLASS_DIR),
        num_class_images=len(list(CLASS_DIR.iterdir())),
        max_steps=case.warmup + case.steps,
        lr_warmup_steps=0,
        checkpointing_steps=0,
        validation_steps=0,
        num_validation_images=1,
        validation_inference_steps=1,
        output_dir=str(output_dir),
    )
    if model != "tiny":
        return config.replace(vae=None)  # the random folder's own VAE stands in for the fp16-fix one
    if dry_run:  # CPU stand-ins for what needs CUDA; the tiny model's own size
        return config.replace(vae=None, resolution=64, mixed_precision="no", use_8bit_adam=False)
    return config


# --------------------------------------------------------------------------------------------------------------------
# Workers: one loop, one process.


def measure(loop: str, config: TrainConfig, warmup: int) -> dict:
    """Train with `loop` ("ours" or "reference") and return its step times, peak memory and final loss."""
    if not torch.cuda.is_available():
        # train() runs tiny CPU work on one thread (it is faster there); the reference gets the same, for equal terms.
        torch.set_num_threads(1)
    stamps: list[float] = []
    losses: list[float] = []
    peak: list[tuple[float, str]] = []

    def on_step(step: int, loss: float) -> None:
        common.synchronize()
        stamps.append(time.perf_counter())
        losses.append(loss)
        if step == config.max_steps:  # read before anything after the loop (saving, sampling) can add to it
            peak.append(common.peak_memory())

    common.reset_peak_memory()
    if loop == "ours":
        from dreambooth_lib.train import train

        train(config, callbacks=[lambda step, row: on_step(step, row["loss"])])
    else:
        from reference_loop import train_reference

        train_reference(config, on_step)
    durations = common.step_durations(stamps, warmup)
    (peak_gib, peak_kind), *_ = peak
    return {
        "loop": loop,
        "median_s_per_step": statistics.median(durations),
        "step_seconds": durations,
        "peak_gib": peak_gib,
        "peak_kind": peak_kind,
        "final_loss": losses[-1],
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------------
# The driver: both loops for every case, then one table.


def run_case(case: Case, model: str, folder: Path, *, dry_run: bool) -> dict:
    config = bench_config(case, model, folder / case.preset, dry_run=dry_run)
    config_file = folder / f"{case.preset}.json"
    config.save(config_file)
    results = {}
    for loop in ("reference", "ours"):
        started = time.perf_counter()
        arguments = ["--worker", loop, "--config", str(config_file), "--warmup", str(case.warmup)]
        results[loop] = common.run_worker(Path(__file__), arguments, timeout=900)
        print(
            f"{case.preset} / {loop}: {results[loop]['median_s_per_step']:.4f} s/step, "
            f"{time.perf_counter() - started:.0f} s in all",
            flush=True,
        )
    ours, reference = results["ours"], results["reference"]
    return {
        "case": case.preset,
        "warmup_steps": case.warmup,
        "measured_steps": case.steps,
        "settings": {key: getattr(config, key) for key in REPORTED_SETTINGS},
        "estimate_gib": estimate_memory_gib(config).total,
        "reference": reference,
        "ours": ours,
        "time_ratio": ours["median_s_per_step"] / reference["median_s_per_step"],
        "memory_ratio": ours["peak_gib"] / reference["peak_gib"],
        # Only a GPU peak says anything about a T4; the CPU's resident set counts other things.
        "under_t4_budget": ours["peak_gib"] < T4_BUDGET_GIB
        if case.preset in T4_PRESETS and ours["peak_kind"] == "CUDA max allocated"
        else None,
    }


def table(report: dict) -> str:
    header = [
        "setting",
        "reference s/step",
        "ours s/step",
        "ours it/s",
        "time ours/ref",
        "reference peak",
        "ours peak",
        "memory ours/ref",
        "estimate",
        f"T4 preset under {T4_BUDGET_GIB:.0f} GiB",
    ]
    rows = []
    for case in report["cases"]:
        ours, reference = case["ours"], case["reference"]
        rows.append(
            [
                case["case"],
                f"{reference['median_s_per_step']:.3f}",
                f"{ours['median_s_per_step']:.3f}",
                f"{1 / ours['median_s_per_step']:.2f}",
                f"{case['time_ratio']:.2f}",
                f"{reference['peak_gib']:.2f} GiB",
                f"{ours['peak_gib']:.2f} GiB",
                f"{case['memory_ratio']:.2f}",
                f"{case['estimate_gib']:.2f} GiB",
                {True: "yes", False: "NO", None: "-"}[case["under_t4_budget"]],
            ]
        )
    kind = report["cases"][0]["ours"]["peak_kind"]
    return common.markdown_table(header, rows) + f"\n\nPeak memory: {kind}. {report['machine']['device']}."


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--cases", help="comma-separated preset names to run (default: all of the mode's)")
    parser.add_argument("--steps", type=int, help="measured steps per case (default: the case's)")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = measure(args.worker, TrainConfig.from_file(args.config), args.warmup)
        args.result.write_text(json.dumps(result))
        return 0

    label = common.mode_label(parser, args)
    cases = GPU_CASES if (args.gpu or args.dry_run) else CPU_CASES
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {case.preset for case in cases})
        if unknown:
            parser.error(f"unknown case(s) {unknown}; this mode has {[case.preset for case in cases]}")
        cases = [case for case in cases if case.preset in wanted]
    if args.steps:
        cases = [Case(case.preset, case.warmup, args.steps) for case in cases]
    started = time.perf_counter()
    report = {"machine": common.machine(), "mode": label, "command": " ".join(sys.argv), "cases": []}
    with tempfile.TemporaryDirectory() as folder:
        for case in cases:
            model = "tiny"
            if args.gpu:
                preset = PRESETS[case.preset]
                model = str(common.random_model_folder(resolve_kind(preset.model, preset.kind), args.models))
            report["cases"].append(run_case(case, model, Path(folder), dry_run=args.dry_run))
    report["seconds"] = time.perf_counter() - started
    print()
    print(table(report))
    print(f"\n{len(cases)} case(s) in {report['seconds']:.0f} s")
    common.write_json(args.json or common.RESULTS / f"train_speed-{label}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
