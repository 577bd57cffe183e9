"""Command line: `python -m dreambooth_lib COMMAND ...` (also under `accelerate launch`).

Each command is one small function that parses nothing itself: `main` builds the parser, the function does the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dreambooth_lib.environment import default_device, environment_report, select_mode


def _default_source(kind: str) -> str:
    from dreambooth_lib.models import DEFAULT_MODELS, TINY

    return TINY if select_mode().is_tiny else DEFAULT_MODELS[kind]


def run_generate(args: argparse.Namespace) -> int:
    """Build the pipeline in the current mode and write a grid of generated images."""
    from dreambooth_lib.generate import generate
    from dreambooth_lib.models import build_pipeline, load_components
    from dreambooth_lib.plots import image_grid

    print(environment_report())
    device = default_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    source = args.model or _default_source(args.kind)
    components = load_components(source, kind=args.kind if source == "tiny" else None, torch_dtype=dtype)
    pipeline = build_pipeline(components).to(device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_lib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate an image grid from a base or trained model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--model", help="'tiny', a hub id or a pipeline folder (default: the current mode's base model)")
    gen.add_argument("--kind", choices=("sd", "sdxl"), default="sd", help="model family of the default/tiny model")
    gen.add_argument("--num-images", type=int, default=4)
    gen.add_argument("--steps", type=int, default=25, help="sampling steps of the multistep solver")
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="outputs/generate.png", help="where to write the PNG grid")
    gen.set_defaults(run=run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
