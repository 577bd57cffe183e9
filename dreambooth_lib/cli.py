"""Command line: `python -m dreambooth_lib COMMAND ...` (also under `accelerate launch`).

Each command is one small function that parses nothing itself: `main` builds the parser, the function does the work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dreambooth_lib.environment import (
    default_device,
    environment_report,
    one_cpu_thread,
    quiet_known_warnings,
    select_mode,
)


def _default_source(kind: str) -> str:
    from dreambooth_lib.families import DEFAULT_MODELS, TINY

    return TINY if select_mode().is_tiny else DEFAULT_MODELS[kind]


def run_generate(args: argparse.Namespace) -> int:
    """Build the pipeline in the current mode and write a grid of generated images."""
    from dreambooth_lib.generate import generate
    from dreambooth_lib.models import build_pipeline, load_components
    from dreambooth_lib.plots import image_grid

    print(environment_report())
    device = default_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = args.model or _default_source(args.kind or "sd")
    components = load_components(source, kind=args.kind, torch_dtype=dtype)
    pipeline = build_pipeline(components).to(device)
    if args.lora:
        from dreambooth_lib.lora import load_lora

        load_lora(pipeline, args.lora, scale=args.lora_scale)
        source = f"{source} + LoRA {args.lora} (scale {args.lora_scale})"
    images = generate(
        pipeline,
        args.prompt,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        negative_prompt=args.negative_prompt,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    print(f"wrote {len(images)} images of {args.prompt!r} from {source} to {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """The DreamBooth paper's metrics for each run folder: calibration, table, results JSON, bar chart, grids."""
    from dreambooth_lib.evaluate import (
        PAPER_ROWS,
        calibrate,
        evaluate_runs,
        load_backbones,
        load_real_images,
        metrics_bar_chart,
        prompt_grid_figure,
        results_table,
        save_results,
    )

    print(environment_report())
    real_images = load_real_images(args.instance_dir)
    backbones = load_backbones()
    calibration = calibrate(backbones, real_images)
    paper = PAPER_ROWS["Real Images (paper)"]
    print(
        "calibration, real images against each other: "
        + ", ".join(f"{k} {v:.3f} (paper {paper[k]})" for k, v in calibration.items())
    )
    results = evaluate_runs(
        args.runs,
        backbones,
        real_images,
        identifier=args.identifier,
        class_noun=args.class_noun,
        images_per_prompt=args.images_per_prompt,
        prompt_count=args.prompts,
        num_inference_steps=args.steps,
        seed=args.seed,
    )
    print(results_table(results))
    out = Path(args.out)
    save_results(results, out / "results.json")
    metrics_bar_chart(results).savefig(out / "metrics.png", dpi=120)
    for result in results:
        prompt_grid_figure(result).savefig(out / f"{result.name}-grid.png", dpi=100)
    print(f"wrote results.json, metrics.png and one image grid per run to {out}")
    return 0


def run_check_data(args: argparse.Namespace) -> int:
    """Decode every file of an image folder and print a table; exit 0 when training can use it, 1 when not."""
    from dreambooth_lib.images import check_folder

    report = check_folder(args.folder, args.resolution)
    print(report.table())
    return 0 if report.ok else 1


def run_train(args: argparse.Namespace) -> int:
    """Train DreamBooth: a preset, then a config file over it, then `--set key=value` over both."""
    from dreambooth_lib.config import TrainConfig
    from dreambooth_lib.train import train

    config = TrainConfig.preset(args.preset)
    if args.config:
        config = TrainConfig.from_file(args.config, base=config)
    return _report_run(train(config.with_assignments(args.set).validate()))


def run_demo(args: argparse.Namespace) -> int:
    """A tiny DreamBooth with prior preservation on the sample dog, on any CPU, offline, in about a minute."""
    from dreambooth_lib.assets import data_path
    from dreambooth_lib.config import TrainConfig
    from dreambooth_lib.train import train

    print(environment_report())
    config = TrainConfig.preset(
        "tiny-cpu",
        instance_dir=str(data_path("subjects", "dog")),
        output_dir=args.out,
        resume_from="latest",  # a second demo into the same folder continues (or just re-saves) the first
    )
    if args.steps is not None:
        config = config.replace(max_steps=args.steps)
    with one_cpu_thread():
        return _report_run(train(config))


def run_toy(args: argparse.Namespace) -> int:
    """DreamBooth on the toy digit model, with and without prior preservation, measured; a few minutes on a CPU."""
    from dreambooth_lib.files import atomic_output
    from dreambooth_lib.toy_dreambooth import ToyExperiment, metrics_table, run_toy_experiment, samples_figure

    if args.steps is not None and args.steps < 1:
        print(f"error: --steps {args.steps}: give a number of training steps of at least 1.", file=sys.stderr)
        return 2
    settings = ToyExperiment() if args.steps is None else ToyExperiment(steps=args.steps)
    try:
        metrics = run_toy_experiment(args.out, settings)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(metrics_table(metrics))
    with atomic_output(Path(args.out) / "samples.png") as temporary:  # every model's samples in one picture
        samples_figure(args.out).save(temporary, format="PNG")
    print(f"wrote metrics.json, samples.png, subject/ and samples/ to {args.out} in {metrics['seconds']:.0f} s")
    return 0


def _report_run(result) -> int:
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every process returns here; one reports
        print(f"wrote the run folder {result.run_dir}: {result.output.name}, samples.png, loss.png, README.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dreambooth_lib.config import PRESETS

    parser = argparse.ArgumentParser(prog="python -m dreambooth_lib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image grid from a base or trained model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", help="'tiny', a hub id or a pipeline folder (default: the current mode's base model)")
    gen.add_argument(
        "--kind", choices=("sd", "sdxl"), help="model family (default: read from the model; the tiny model's is sd)"
    )
    gen.add_argument(
        "--lora",
        metavar="FILE_OR_FOLDER",
        help="a LoRA (diffusers or kohya .safetensors, or a folder with pytorch_lora_weights.safetensors) for --model",
    )
    gen.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength: 0 = base model, 1 = as trained")
    gen.add_argument("--num-images", type=int, default=4)
    gen.add_argument("--steps", type=int, default=25, help="sampling steps of the multistep solver")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="outputs/generate.png", help="where to write the PNG grid")
    gen.set_defaults(run=run_generate)

    ev = commands.add_parser("evaluate", help="score trained runs with the DreamBooth paper's metrics")
    ev.add_argument("runs", nargs="+", metavar="RUN_FOLDER", help="training output folders (config.json + weights)")
    ev.add_argument("--instance-dir", required=True, help="the real images of the subject")
    ev.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog (picks the prompt list)")
    ev.add_argument("--identifier", default="sks", help="the rare token the runs were trained with")
    ev.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (the paper: 4; at least 2)")
    ev.add_argument("--prompts", type=int, help="use the first K of the paper's 25 prompt templates (default: all)")
    ev.add_argument("--steps", type=int, default=25, help="sampling steps of the multistep solver")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="outputs/evaluation", help="folder for results.json, metrics.png and grids")
    ev.set_defaults(run=run_evaluate)

    check = commands.add_parser("check-data", help="check an instance/class image folder before training")
    check.add_argument("folder", help="the folder of images")
    check.add_argument("--resolution", type=int, help="training resolution: smaller images are flagged")
    check.set_defaults(run=run_check_data)
    tr = commands.add_parser("train", help="DreamBooth fine-tuning (full or LoRA) from a preset and overrides")
    tr.add_argument(
        "--preset",
        default="tiny-cpu",
        choices=sorted(PRESETS),
        metavar="PRESET",
        help=f"starting settings, one of: {', '.join(sorted(PRESETS))} (default: %(default)s)",
    )
    tr.add_argument("--config", help="a JSON/YAML file of TrainConfig fields, applied over the preset")
    tr.add_argument(
        "--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="override fields, e.g. max_steps=200"
    )
    tr.set_defaults(run=run_train)

    demo = commands.add_parser("demo", help="tiny DreamBooth with prior preservation on the sample dog (CPU, ~1 min)")
    demo.add_argument("--out", default="outputs/demo", help="the run folder to write")
    demo.add_argument("--steps", type=int, help="training steps (default: the tiny-cpu preset's)")
    demo.set_defaults(run=run_demo)

    toy = commands.add_parser("toy", help="DreamBooth on a toy digit model that really learns (CPU, a few minutes)")
    toy.add_argument("--out", default="outputs/toy", help="folder for metrics.json, subject/ and samples/")
    toy.add_argument("--steps", type=int, help="DreamBooth steps of the two main runs (default: the lesson's)")
    toy.set_defaults(run=run_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a mistake the user can fix (data, settings, model source, device) prints one `error:` line
    naming the cause and the fix, and exits 2, instead of a traceback."""
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions whose messages name a user's mistake and its fix (imported only when something failed); a run
    that cannot go on as asked (another run's folder, a live run, NaN losses, a full disk) is one of them."""
    from dreambooth_lib.config import ConfigError
    from dreambooth_lib.files import NoSpaceError
    from dreambooth_lib.images import DataError
    from dreambooth_lib.models import ModelSourceError
    from dreambooth_lib.runs import RunError

    return ConfigError, DataError, ModelSourceError, RunError, NoSpaceError, FileNotFoundError
