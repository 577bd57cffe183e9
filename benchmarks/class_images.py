"""Class-image generation throughput: our batched generator against one image at a time with a 50-step sampler.

    python benchmarks/class_images.py          # the tiny model on this CPU (under a minute)
    python benchmarks/class_images.py --gpu    # full-size SD 1.5 (512 px) and SDXL (1024 px), random weights, fp16
    python benchmarks/class_images.py --dry-run  # the GPU cases on tiny components, on a CPU

Ours is what `train()` runs for prior preservation: `priors.generate_class_images` on `models.build_pipeline`, i.e.
DPM-Solver++ (Lu et al. 2022) for the presets' 25 steps, `class_batch_size` images per call. The reference is the
usual way: the stock pipeline with the sampler the published model ships with (PNDM for SD 1.5, Euler for SDXL) at
the pipelines' default 50 steps, one image per call. Both write PNGs, both use classifier-free guidance 7.5, in the
same process, on the same components, after one warm-up call each. The GPU models are the full-size architectures
with random weights: speed does not depend on the weights' values (image quality does, and is not measured here).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, PNDMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the benchmarks folder is not a package: each script runs by its path)

from dreambooth_lib.config import TrainConfig  # noqa: E402
from dreambooth_lib.models import build_pipeline, load_components, tiny_components  # noqa: E402
from dreambooth_lib.priors import generate_class_images  # noqa: E402

PROMPT = "a photo of a dog"
DEFAULT_SCHEDULERS = {"sd": PNDMScheduler, "sdxl": EulerDiscreteScheduler}
REFERENCE_STEPS = 50
# (family, images per loop) for each mode; ours and the reference make the same number.
CPU_CASES = [("sd", 16)]
GPU_CASES = [("sd", 16), ("sdxl", 6)]


def time_ours(pipeline, folder: Path, count: int, config: TrainConfig) -> float:
    """Seconds for `count` class images the way train() makes them (after a warm-up batch in another folder)."""
    options = dict(batch_size=config.class_batch_size, num_inference_steps=config.class_inference_steps, progress=False)
    generate_class_images(pipeline, folder / "warm-up", PROMPT, config.class_batch_size, **options)
    common.synchronize()
    started = time.perf_counter()
    generate_class_images(pipeline, folder / "ours", PROMPT, count, **options)
    common.synchronize()
    return time.perf_counter() - started


def time_reference(pipeline, folder: Path, count: int) -> float:
    """Seconds for `count` images, one per call, the stock pipeline's default sampler and step count."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(PROMPT, num_inference_steps=REFERENCE_STEPS)  # warm-up
    common.synchronize()
    started = time.perf_counter()
    for index in range(count):
        generator = torch.Generator("cpu").manual_seed(index)
        image = pipeline(PROMPT, num_inference_steps=REFERENCE_STEPS, generator=generator).images[0]
        image.save(folder / f"{index:05d}.png")
    common.synchronize()
    return time.perf_counter() - started


def measure(kind: str, count: int, model: str, folder: Path) -> dict:
    """Both generators on one model: images per second, and the minutes 200 class images would take."""
    config = TrainConfig()  # the presets share these class-image settings
    if model == "tiny":
        components, device = tiny_components(kind), "cpu"
    else:
        components, device = load_components(model, kind=kind, torch_dtype=torch.float16), "cuda"
    ours = build_pipeline(components).to(device)
    # SD 1.5 ships PNDM without its Runge-Kutta warm-up steps (skip_prk_steps); the option is ignored by Euler.
    default = DEFAULT_SCHEDULERS[kind].from_config(components.noise_scheduler.config, skip_prk_steps=True)
    reference = build_pipeline(components, scheduler=default).to(device)
    seconds = {
        "reference": time_reference(reference, folder / kind / "reference", count),
        "ours": time_ours(ours, folder / kind, count, config),
    }
    rates = {loop: count / value for loop, value in seconds.items()}
    return {
        "kind": kind,
        "model": f"tiny {kind}" if model == "tiny" else f"full-size {kind} architecture, random weights, fp16",
        "resolution": components.resolution,
        "images": count,
        "reference": {"sampler": default.__class__.__name__, "steps": REFERENCE_STEPS, "batch_size": 1},
        "ours": {
            "sampler": ours.scheduler.__class__.__name__,
            "steps": config.class_inference_steps,
            "batch_size": config.class_batch_size,
        },
        "seconds": seconds,
        "images_per_second": rates,
        "minutes_for_200": {loop: 200 / rate / 60 for loop, rate in rates.items()},
        "speed_up": rates["ours"] / rates["reference"],
    }


def table(report: dict) -> str:
    header = ["model", "resolution", "reference img/s", "ours img/s", "speed-up", "200 images: reference", "ours"]
    rows = [
        [
            case["model"],
            f"{case['resolution']} px",
            f"{case['images_per_second']['reference']:.2f}",
            f"{case['images_per_second']['ours']:.2f}",
            f"{case['speed_up']:.1f}x",
            f"{case['minutes_for_200']['reference']:.1f} min",
            f"{case['minutes_for_200']['ours']:.1f} min",
        ]
        for case in report["cases"]
    ]
    return common.markdown_table(header, rows) + f"\n\n{report['machine']['device']}."


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--images", type=int, help="images per generator and case (default: the case's)")
    args = parser.parse_args(argv)
    label = common.mode_label(parser, args)
    report = {"machine": common.machine(), "mode": label, "command": " ".join(sys.argv), "cases": []}
    output = args.json or common.RESULTS / f"class_images-{label}.json"
    threads = torch.get_num_threads()
    if not args.gpu:
        torch.set_num_threads(1)  # as train() does for tiny CPU work; both generators get the same
    with tempfile.TemporaryDirectory() as folder:
        for kind, count in GPU_CASES if args.gpu or args.dry_run else CPU_CASES:
            model = str(common.random_model_folder(kind, args.models)) if args.gpu else "tiny"
            report["cases"].append(measure(kind, args.images or count, model, Path(folder)))
            common.write_json(output, report)  # after every case: a run cut short still leaves its figures
    torch.set_num_threads(threads)
    print()
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
