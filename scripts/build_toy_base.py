"""Rebuild the toy digit model shipped in `dreambooth_lib/toy_weights/` (about 10 CPU-minutes, single-threaded).

    python scripts/build_toy_base.py                 # train, save, measure, record
    python scripts/build_toy_base.py --metrics-only  # measure the saved weights again and update the record

The record (`record.json`) holds the settings, the first training losses (tests re-run those steps and compare), the
base model's measured quality, the library versions and the sha256 of every weight file (tests compare those too).
Same seed, same settings, same versions: the same first losses; the final weights may differ in the last bits across
CPUs, which is why the record keeps hashes of the files as shipped rather than promising bit-equal rebuilds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
import transformers

from dreambooth_lib.toy_model import (
    RECORD_FILE,
    TOY_WEIGHTS,
    ToySettings,
    save_toy_weights,
    toy_components,
    toy_record,
    train_toy_unet,
    train_toy_vae,
)

FIRST_LOSSES = 5


def measure(folder: Path) -> None:
    """Sample the saved base and write its digit accuracy (and VAE error) into the record."""
    from dreambooth_lib.toy_dreambooth import base_metrics

    record = toy_record(folder)
    record["metrics"] = base_metrics(toy_components(folder))
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["metrics"], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOY_WEIGHTS, help="folder for the weights and record.json")
    parser.add_argument("--metrics-only", action="store_true", help="measure the saved weights; train nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same arithmetic on every machine, and no oversubscription
    if not args.metrics_only:
        settings = ToySettings()
        start = time.perf_counter()
        components, vae_losses = train_toy_vae(settings)
        losses = train_toy_unet(components, settings)
        record = {
            "settings": asdict(settings),
            "vae_first_losses": vae_losses[:FIRST_LOSSES],
            "vae_final_loss": vae_losses[-1],
            "unet_first_losses": losses[:FIRST_LOSSES],
            "unet_final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "train_seconds": round(time.perf_counter() - start, 1),
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }
        save_toy_weights(components, args.out, record)
        print(f"saved the toy weights to {args.out} after {record['train_seconds']} s")
    measure(args.out)


if __name__ == "__main__":
    main()
