"""The seed notebooks' SD 1.5 recipe end to end, as a user runs it: loading, class images, 400 steps, saving.

    python benchmarks/seed_recipe.py --gpu --card-gib 15   # full-size random SD 1.5 on a CUDA GPU (~4-5 minutes)
    python benchmarks/seed_recipe.py --dry-run             # the same path on the tiny model saved as a folder (CPU)

One process, `python -m dreambooth_lib train` with the `seed-sd15` preset on the sample dog, under `probe.py`: it
generates the class images (none exist yet), trains, saves the pipeline, the loss curve, samples and model card. The
report splits the wall time at the first and last optimiser steps: before (loading, class images, caching), the loop,
after (saving and sampling), with the median s/step and the whole process's peak memory. `--dry-run` keeps the path
and shrinks the work (64 px, 6 steps, 4 class images) so a CPU runs it in a minute.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import probe  # noqa: E402

probe.torchvision_without_its_extension()

from train_speed import INSTANCE_DIR, model_folder, run_probed  # noqa: E402

from dreambooth_lib.config import PRESETS, TrainConfig  # noqa: E402

PRESET = "seed-sd15"
WARMUP = 3


def recipe_config(model: str, folder: Path, *, dry_run: bool) -> TrainConfig:
    """The seed preset on the model folder, writing under `folder`; --dry-run: its CPU-sized stand-in."""
    config = PRESETS[PRESET].replace(
        model=model,
        vae=None,
        instance_dir=str(INSTANCE_DIR),
        class_dir=str(folder / "class_images"),
        output_dir=str(folder / "run"),
    )
    if dry_run:
        return config.replace(
            resolution=64,
            mixed_precision="no",
            use_8bit_adam=False,
            max_steps=6,
            num_class_images=4,
            class_inference_steps=2,
            validation_inference_steps=2,
            num_validation_images=1,
        )
    return config


def phases(result: dict, warmup: int = WARMUP) -> dict:
    """Where the wall time went, from the probe's step timestamps (seconds since the process started)."""
    stamps = result["stamps"]
    if result["exit"] != 0 or len(stamps) <= warmup:
        failed = {"exit": result["exit"], "error": result.get("error")}
        return {**failed, "seconds": result["seconds"], "steps": len(stamps), "peak": result["peak"]}
    return {
        "exit": 0,
        "seconds": result["seconds"],
        "steps": len(stamps),
        "before_first_step_s": stamps[0],
        "loop_s": stamps[-1] - stamps[0],
        "after_last_step_s": result["seconds"] - stamps[-1],
        "median_s_per_step": statistics.median(common.step_durations(stamps, warmup)),
        "peak": result["peak"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--card-gib", type=float, help="run as on a card of this many GiB (CUDA)")
    args = parser.parse_args(argv)
    label = common.mode_label(parser, args)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        config = recipe_config(model_folder("sd", args, folder), folder, dry_run=not args.gpu)
        config.save(folder / "config.json")
        target = ["-m", "dreambooth_lib", "train", "--config", str(folder / "config.json")]
        result = run_probed(target, card_gib=args.card_gib, environment={}, timeout=1800)
        made = len(list((folder / "class_images").glob("*.png")))
        saved = (folder / "run" / "pipeline" / "model_index.json").is_file()
    report = {
        "machine": common.machine(),
        "mode": label,
        "preset": PRESET,
        "card_gib": args.card_gib,
        "settings": {k: v for k, v in config.to_dict().items() if k not in ("model", "output_dir", "class_dir")},
        "class_images_made": made,
        "pipeline_saved": saved,
        **phases(result),
    }
    print(report)
    common.write_json(args.json or common.RESULTS / f"seed_recipe-{label}.json", report)
    return 0 if report["exit"] == 0 and saved and made == config.num_class_images else 1


if __name__ == "__main__":
    raise SystemExit(main())
