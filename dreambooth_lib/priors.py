"""Class images for prior preservation (DreamBooth, Ruiz et al. 2023, section 3.3, eq. 2).

The prior-preservation loss needs images of the subject's class ("a dog") sampled from the frozen base model being
fine-tuned. Generating them is the slowest set-up step, so it is resumable: image i is always `class-<i>.png` from seed
`seed + i`, each file appears only once complete (written under a temporary name, then renamed), and a restart makes
just the images still missing, identical to those an uninterrupted run would have made.

Each generated image has a sidecar recording its provenance (prompt, model, resolution, seed, steps). Images made for
another prompt, model or resolution are never counted for this one: the folder is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tqdm.auto import tqdm

from dreambooth_lib.files import atomic_output, remove_stale_temporaries, write_text_atomically
from dreambooth_lib.generate import generate
from dreambooth_lib.images import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
CLASS_IMAGE_PREFIX = "class-"
# The files generate_class_images writes: images and their provenance sidecars.
GENERATED_FILE = re.compile(rf"^{CLASS_IMAGE_PREFIX}\d+\.(png|json)$")


def class_image_name(index: int) -> str:
    """The stable file name of generated class image `index` (its seed is the run's seed + index)."""
    return f"{CLASS_IMAGE_PREFIX}{index:05d}.png"


def existing_class_images(class_dir: str | os.PathLike) -> list[Path]:
    """The complete images in `class_dir`, generated or supplied by the user; hidden and temporary files excluded."""
    folder = Path(class_dir)
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _missing_indices(class_dir: Path, num_class_images: int) -> list[int]:
    """Indices of the class images still to generate: any image already there counts toward the number asked for."""
    existing = existing_class_images(class_dir)
    taken = {path.name for path in existing}
    missing: list[int] = []
    index = 0
    while len(existing) + len(missing) < num_class_images:
        if class_image_name(index) not in taken:
            missing.append(index)
        index += 1
    return missing


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Runs of consecutive indices within the same block of `batch_size`, so image i is made in the same batch
    whether the run is fresh or resumed (batch composition can change the last bit of a float on some devices)."""
    batches: list[list[int]] = []
    for index in indices:
        last = batches[-1] if batches else None
        if last and last[-1] + 1 == index and index // batch_size == last[0] // batch_size:
            last.append(index)
        else:
            batches.append([index])
    return batches


def _provenance(image: Path) -> dict:
    try:
        return json.loads(image.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def check_class_images(class_dir: str | os.PathLike, **wanted) -> None:
    """Raise DataError if an image generated into `class_dir` was made with other settings than `wanted`
    (e.g. `prompt=..., model=..., resolution=...`; None values are not compared).

    Images a user put in the folder under other names are theirs and are not checked.
    """
    wanted = {key: value for key, value in wanted.items() if value is not None}
    for image in existing_class_images(class_dir):
        if not GENERATED_FILE.match(image.name):
            continue
        recorded = _provenance(image)
        differ = [key for key in wanted if recorded.get(key) != wanted[key]]
        if differ:
            found = ", ".join(f"{key} {recorded.get(key, 'unrecorded')!r}" for key in differ)
            raise DataError(
                f"class_dir {class_dir} holds class images made for other settings ({image.name}: {found}; this run "
                f"wants {', '.join(f'{key} {wanted[key]!r}' for key in differ)}): set class_dir to another folder "
                "(they are generated there), or delete the class-*.png/json files in it to make them again."
            )


def generate_class_images(
    pipeline,
    class_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    *,
    batch_size: int = 4,
    num_inference_steps: int = 25,
    seed: int = 0,
    model: str | None = None,
    resolution: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Make sure `class_dir` holds at least `num_class_images` images of `class_prompt`, generating only the missing.

    Args:
        pipeline: the frozen base model's pipeline (fp16 on a GPU, with a fast multistep solver such as
            `models.build_pipeline`'s), the same model that is fine-tuned.
        class_dir: created when missing. Images already there (any name) count toward `num_class_images`.
        num_inference_steps: sampling steps per image (25 suffice for DPM-Solver++).
        seed: image `i` (file `class-<i>.png`) uses seed `seed + i`.
        model: the base model's name, recorded in the sidecars (what `TrainConfig.model` says).
        resolution: image side in pixels (default: the model's native size), recorded in the sidecars.

    Each generated image gets a JSON sidecar (`class-<i>.json`: prompt, model, resolution, seed, steps) written before
    the image. Images generated earlier with another prompt (or model, or resolution, when given) raise DataError.

    Returns:
        Every image in `class_dir`, sorted by name.
    """
    if not class_prompt or not class_prompt.strip():
        raise ValueError("class_prompt is empty: name the subject's class, e.g. 'a photo of a dog'.")
    if num_class_images < 0 or batch_size < 1 or num_inference_steps < 1:
        raise ValueError(
            f"num_class_images={num_class_images} (>= 0), batch_size={batch_size} and "
            f"num_inference_steps={num_inference_steps} (>= 1) are out of range."
        )
    folder = Path(class_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"class_dir {folder} is a file: pass a folder for the class images.")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # images a crashed run was writing
    check_class_images(folder, prompt=class_prompt, model=model, resolution=resolution)
    missing = _missing_indices(folder, num_class_images)
    bar = tqdm(
        total=len(missing), desc=f"class images ({class_prompt})", unit="img", disable=not progress or not missing
    )
    for batch in _batches(missing, batch_size):
        images = generate(
            pipeline,
            class_prompt,
            num_images=len(batch),
            seed=seed + batch[0],  # generate() gives image j of the call seed + batch[0] + j
            num_inference_steps=num_inference_steps,
            resolution=resolution,
            batch_size=len(batch),
            progress=False,
        )
        for index, image in zip(batch, images, strict=True):
            image_path = folder / class_image_name(index)
            record = {
                "file": image_path.name,
                "prompt": class_prompt,
                "model": model,
                "resolution": image.width,
                "seed": seed + index,
                "steps": num_inference_steps,
            }
            write_text_atomically(image_path.with_suffix(".json"), json.dumps(record) + "\n")
            with atomic_output(image_path) as temporary:
                image.save(temporary, format="PNG")
            bar.update(1)
    bar.close()
    return existing_class_images(folder)
