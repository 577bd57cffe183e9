"""The DreamBooth paper's metrics (Ruiz et al. 2023, section 4.1 and Table 3), computed the way the paper defines them.

- DINO: mean pairwise cosine similarity between DINO ViT-S/16 embeddings (CLS token) of generated and real images.
  Subject fidelity; the paper's preferred metric, because DINO is not trained to ignore differences within a class.
- CLIP-I: the same with CLIP image embeddings. Subject fidelity, blind to details a caption would not mention.
- CLIP-T: mean cosine similarity between each image's CLIP embedding and its prompt's (without the identifier).
  Prompt fidelity.
- PRES: DINO between images of the bare class prompt ("a dog") and the real subject. Prior preservation: the higher,
  the more "a dog" has collapsed onto *your* dog (language drift), so lower is better.
- DIV: diversity among images of one prompt: mean pairwise LPIPS distance when the `lpips` package can be imported,
  otherwise 1 - mean pairwise DINO similarity (labelled as such, and not comparable with the paper's LPIPS numbers).

The paper does not name its CLIP backbone; follow-up work that reports its numbers uses OpenAI's ViT-B/32, which is
the default here, named in every result. Tiny randomly initialised backbones of the same classes serve tiny mode and
the tests: their numbers exercise the code, they do not measure anything.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from dreambooth_lib.assets import data_dir
from dreambooth_lib.environment import default_device, select_mode
from dreambooth_lib.files import write_text_atomically
from dreambooth_lib.generate import generate
from dreambooth_lib.models import _source_error, load_run_pipeline, load_tokenizer, tiny_clip_text_config

# The hub repositories keep safetensors weights on the safetensors bot's pull-request branches, not on main (which
# holds only pickled .bin files); those refs are pinned so loading never falls back to a pickle.
DINO_MODEL = "facebook/dino-vits16"
DINO_REVISION = "refs/pr/1"
CLIP_MODEL = "openai/clip-vit-base-patch32"
CLIP_REVISION = "refs/pr/15"

PROMPTS_FILE = data_dir() / "subjects" / "prompts_and_classes.txt"
# The dataset's nine live subjects are its cats and dogs; every other subject is an object.
LIVE_CLASSES = ("dog", "cat")

METRICS = ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV")
HIGHER_IS_BETTER = {"DINO": True, "CLIP-I": True, "CLIP-T": True, "PRES": False, "DIV": True}

# The paper's numbers (Table 1: 30 subjects x 25 prompts x 4 images; Table 3: Imagen on 15 subjects, with and
# without the prior-preservation loss). PRES and DIV exist only for Table 3's rows.
PAPER_ROWS: dict[str, dict[str, float]] = {
    "Real Images (paper)": {"DINO": 0.774, "CLIP-I": 0.885},
    "DreamBooth SD (paper)": {"DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305},
    "Textual Inversion SD (paper)": {"DINO": 0.569, "CLIP-I": 0.780, "CLIP-T": 0.255},
    "DreamBooth Imagen w/ PPL (paper)": {"DINO": 0.684, "CLIP-I": 0.815, "CLIP-T": 0.308, "PRES": 0.493, "DIV": 0.391},
    "DreamBooth Imagen w/o PPL (paper)": {"DINO": 0.712, "CLIP-I": 0.828, "CLIP-T": 0.306, "PRES": 0.664, "DIV": 0.371},
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------------------
# Backbones


@dataclass(frozen=True)
class ImageTransform:
    """Resize the short side to `size` (bicubic), centre-crop a square, scale to [0, 1], normalise per channel."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        arrays = []
        for image in images:
            image = image.convert("RGB")
            scale = self.size / min(image.size)
            width, height = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
            image = image.resize((width, height), Image.Resampling.BICUBIC)
            left, top = (width - self.size) // 2, (height - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        pixels = (np.stack(arrays) - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


@dataclass
class Backbones:
    """The two embedding networks of the paper's metrics, their input transforms, and the names results carry."""

    dino: ViTModel
    clip: CLIPModel
    tokenizer: CLIPTokenizer
    dino_transform: ImageTransform
    clip_transform: ImageTransform
    dino_name: str
    clip_name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 16

    def _batched(self, images: Sequence[Image.Image], transform: ImageTransform, embed) -> torch.Tensor:
        if not images:
            raise ValueError("no images to embed: pass at least one PIL image.")
        chunks = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                pixels = transform(images[start : start + self.batch_size]).to(self.device)
                chunks.append(embed(pixels).float().cpu())
        return torch.cat(chunks)

    def embed_dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """DINO's image embedding is the final (layer-normed) CLS token, as in the DINO paper's evaluations."""
        return self._batched(images, self.dino_transform, lambda x: self.dino(pixel_values=x).last_hidden_state[:, 0])

    def embed_clip_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP's image embedding: pooled vision output through the visual projection (the joint text-image space)."""
        return self._batched(
            images, self.clip_transform, lambda x: self.clip.visual_projection(self.clip.vision_model(x).pooler_output)
        )

    def embed_clip_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP's text embedding: the end-of-text token's state through the text projection (same space as images)."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            pooled = self.clip.text_model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).pooler_output
            return self.clip.text_projection(pooled).float().cpu()


def tiny_backbones(seed: int = 0) -> Backbones:
    """Randomly initialised ViT and CLIP of the real classes, 32 px inputs: for tests and tiny mode (CPU, offline)."""
    size = 32
    torch.manual_seed(seed)
    dino = ViTModel(
        ViTConfig(
            image_size=size,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).eval()
    torch.manual_seed(seed + 1)
    clip = CLIPModel(
        CLIPConfig(
            text_config=tiny_clip_text_config(32).to_dict(),
            vision_config=dict(
                image_size=size,
                patch_size=8,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            projection_dim=32,
        )
    ).eval()
    return Backbones(
        dino=dino,
        clip=clip,
        tokenizer=load_tokenizer(),
        dino_transform=ImageTransform(size, IMAGENET_MEAN, IMAGENET_STD),
        clip_transform=ImageTransform(size, CLIP_MEAN, CLIP_STD),
        dino_name="tiny random ViT (stands in for DINO ViT-S/16)",
        clip_name="tiny random CLIP (stands in for CLIP ViT-B/32)",
    )


def _from_pretrained(model_class, source: str, revision: str | None, **kwargs):
    """Load with safetensors only; a hub or folder failure becomes the same ModelSourceError the SD loaders raise."""
    local = Path(source).expanduser().exists()
    try:
        return model_class.from_pretrained(source, revision=None if local else revision, **kwargs)
    except Exception as error:
        raise _source_error(source, error) from error


def load_backbones(
    tiny: bool | None = None,
    *,
    dino_model: str = DINO_MODEL,
    dino_revision: str | None = DINO_REVISION,
    clip_model: str = CLIP_MODEL,
    clip_revision: str | None = CLIP_REVISION,
    device: torch.device | str | None = None,
) -> Backbones:
    """The metric backbones: tiny random ones in tiny mode (`tiny=None` follows `select_mode()`), else the hub's.

    `dino_model`/`clip_model` may also be local folders (revision is then ignored). The input transforms follow each
    model's own configuration: DINO uses ImageNet statistics, CLIP its own; both read 224 px crops.
    """
    tiny = select_mode().is_tiny if tiny is None else tiny
    device = torch.device(device) if device is not None else default_device()
    if tiny:
        backbones = tiny_backbones()
    else:
        dino = _from_pretrained(ViTModel, dino_model, dino_revision, add_pooling_layer=False, use_safetensors=True)
        clip = _from_pretrained(CLIPModel, clip_model, clip_revision, use_safetensors=True)
        backbones = Backbones(
            dino=dino.eval(),
            clip=clip.eval(),
            tokenizer=_from_pretrained(CLIPTokenizer, clip_model, clip_revision),
            dino_transform=ImageTransform(dino.config.image_size, IMAGENET_MEAN, IMAGENET_STD),
            clip_transform=ImageTransform(clip.config.vision_config.image_size, CLIP_MEAN, CLIP_STD),
            dino_name=dino_model,
            clip_name=clip_model,
        )
    backbones.dino.to(device)
    backbones.clip.to(device)
    backbones.device = device
    return backbones


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, *, exclude_self: bool = False) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair.

    `exclude_self` drops the diagonal, for a set compared with itself (a is b): an image always matches itself.
    """
    similarity = F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T
    if not exclude_self:
        return similarity.mean().item()
    if a.shape != b.shape or len(a) < 2:
        raise ValueError("exclude_self needs one set of at least two embeddings compared with itself.")
    off_diagonal = ~torch.eye(len(a), dtype=torch.bool)
    return similarity[off_diagonal].mean().item()


def dino_score(backbones: Backbones, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> float:
    """DINO subject fidelity: mean pairwise DINO cosine similarity of generated vs real images (higher is better)."""
    return mean_pairwise_cosine(backbones.embed_dino(generated), backbones.embed_dino(real))


def clip_image_score(backbones: Backbones, generated: Sequence[Image.Image], real: Sequence[Image.Image]) -> float:
    """CLIP-I subject fidelity: mean pairwise CLIP image-embedding cosine similarity (higher is better)."""
    return mean_pairwise_cosine(backbones.embed_clip_images(generated), backbones.embed_clip_images(real))


def clip_text_score(backbones: Backbones, images: Sequence[Image.Image], prompts: str | Sequence[str]) -> float:
    """CLIP-T prompt fidelity: mean cosine similarity of each image with *its own* prompt (pairs, not all pairs).

    Pass prompts without the identifier: CLIP has never seen "sks", so the paper scores the plain description.
    """
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"clip_text_score got {len(images)} images but {len(prompts)} prompts: pass one per image.")
    image_embeds = F.normalize(backbones.embed_clip_images(images).double(), dim=-1)
    text_embeds = F.normalize(backbones.embed_clip_texts(prompts).double(), dim=-1)
    return (image_embeds * text_embeds).sum(-1).mean().item()


def prior_preservation_score(
    backbones: Backbones, class_images: Sequence[Image.Image], real: Sequence[Image.Image]
) -> float:
    """PRES: DINO similarity of bare-class-prompt images to the real subject (lower is better: less language drift)."""
    return dino_score(backbones, class_images, real)


def lpips_available() -> bool:
    """Whether the `lpips` package (which needs torchvision) imports here."""
    try:
        importlib.import_module("lpips")
    except Exception:  # ImportError, or torchvision failing inside it
        return False
    return True


def _lpips_diversity(metric: torch.nn.Module, images: Sequence[Image.Image], device: torch.device) -> float:
    """Mean LPIPS distance over the distinct pairs of `images` (0 = identical; larger = perceptually further apart)."""
    # LPIPS reads images in [-1, 1].
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).to(device)
    distances = []
    with torch.no_grad():
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                distances.append(metric(pixels[i : i + 1], pixels[j : j + 1]).item())
    return float(np.mean(distances))


def diversity_score(backbones: Backbones, images_by_prompt: dict[str, Sequence[Image.Image]]) -> tuple[float, str]:
    """DIV: mean over prompts of the pairwise diversity among that prompt's images (higher = more diverse).

    Returns (value, method): LPIPS distance as in the paper when `lpips` imports; otherwise 1 - mean pairwise DINO
    cosine similarity (self-pairs excluded), a stand-in that moves the same way but is on a different scale.
    """
    groups = [list(images) for images in images_by_prompt.values()]
    if not groups or any(len(images) < 2 for images in groups):
        raise ValueError("diversity needs at least two images per prompt: raise images_per_prompt.")
    if lpips_available():
        import lpips

        # The paper's "LPIPS" DIV: higher = more diverse, so it is read as LPIPS *distance* between same-prompt images.
        metric = lpips.LPIPS(net="alex", verbose=False).to(backbones.device)
        values = [_lpips_diversity(metric, images, backbones.device) for images in groups]
        return float(np.mean(values)), "LPIPS (AlexNet)"
    values = [1.0 - mean_pairwise_cosine(e, e, exclude_self=True) for e in map(backbones.embed_dino, groups)]
    return float(np.mean(values)), "1 - DINO similarity (fallback: lpips not importable)"


# --------------------------------------------------------------------------------------------------------------------
# The paper's protocol


def load_prompt_templates(path: str | Path = PROMPTS_FILE) -> dict[str, list[str]]:
    """The paper's 25 prompt templates, {"object": [...], "live": [...]}, with `{0}` = identifier, `{1}` = class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it ships with the package in data/subjects/.")
    text = path.read_text()
    if "Object Prompts" not in text or "Live Subject Prompts" not in text:
        raise ValueError(f"{path}: expected the sections 'Object Prompts' and 'Live Subject Prompts'.")
    objects, live = text.split("Object Prompts", 1)[1].split("Live Subject Prompts", 1)
    templates = {}
    for key, section in (("object", objects), ("live", live)):
        templates[key] = re.findall(r"'([^']*\{0\}[^']*)'\.format", section)
        if len(templates[key]) != 25:
            raise ValueError(f"{path}: expected 25 {key} prompt templates, found {len(templates[key])}.")
    return templates


def protocol_prompts(
    identifier: str, class_noun: str, *, live: bool | None = None, count: int | None = None
) -> list[tuple[str, str]]:
    """(prompt, prompt without identifier) pairs of the paper's templates for this subject.

    `live` picks the live-subject list (accessories, outfits) over the object list; by default it is chosen from the
    class noun. `count` keeps the first `count` templates (the paper uses all 25).
    """
    live = class_noun.lower() in LIVE_CLASSES if live is None else live
    templates = load_prompt_templates()["live" if live else "object"]
    if count is not None:
        if not 1 <= count <= len(templates):
            raise ValueError(f"count={count}: choose between 1 and {len(templates)} prompt templates.")
        templates = templates[:count]
    return [(t.format(identifier, class_noun), " ".join(t.format("", class_noun).split())) for t in templates]


@dataclass
class EvaluationResult:
    """One model's scores, how they were computed, and the images behind them (for grids)."""

    name: str
    scores: dict[str, float]
    diversity_method: str
    dino_model: str
    clip_model: str
    images_per_prompt: int
    images_by_prompt: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)
    class_images: list[Image.Image] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Everything but the images, for JSON."""
        return {
            "name": self.name,
            "scores": self.scores,
            "diversity_method": self.diversity_method,
            "dino_model": self.dino_model,
            "clip_model": self.clip_model,
            "images_per_prompt": self.images_per_prompt,
            "prompts": list(self.images_by_prompt),
        }


def evaluate_images(
    backbones: Backbones,
    images_by_prompt: dict[str, Sequence[Image.Image]],
    plain_prompts: dict[str, str],
    class_images: Sequence[Image.Image],
    real_images: Sequence[Image.Image],
    *,
    name: str = "model",
) -> EvaluationResult:
    """Score already generated images: DINO, CLIP-I over all of them, CLIP-T per prompt, PRES, DIV.

    `plain_prompts` maps each prompt to the text CLIP-T scores it against (the prompt without the identifier).
    """
    generated = [image for images in images_by_prompt.values() for image in images]
    prompts = [plain_prompts[prompt] for prompt, images in images_by_prompt.items() for _ in images]
    diversity, method = diversity_score(backbones, images_by_prompt)
    scores = {
        "DINO": dino_score(backbones, generated, real_images),
        "CLIP-I": clip_image_score(backbones, generated, real_images),
        "CLIP-T": clip_text_score(backbones, generated, prompts),
        "PRES": prior_preservation_score(backbones, class_images, real_images),
        "DIV": diversity,
    }
    return EvaluationResult(
        name=name,
        scores=scores,
        diversity_method=method,
        dino_model=backbones.dino_name,
        clip_model=backbones.clip_name,
        images_per_prompt=len(next(iter(images_by_prompt.values()))),
        images_by_prompt={prompt: list(images) for prompt, images in images_by_prompt.items()},
        class_images=list(class_images),
    )


def evaluate_pipeline(
    pipeline,
    backbones: Backbones,
    real_images: Sequence[Image.Image],
    *,
    identifier: str,
    class_noun: str,
    name: str = "model",
    images_per_prompt: int = 4,
    prompt_count: int | None = None,
    live: bool | None = None,
    class_image_count: int | None = None,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    progress: bool = True,
) -> EvaluationResult:
    """The paper's protocol for one model: `images_per_prompt` images (paper: 4) for each of the 25 templates.

    PRES uses `class_image_count` images of the bare prompt "a {class_noun}" (default: twice images_per_prompt).
    Seeds repeat across prompts and models, so two models are compared on the same starting noise.
    """
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt={images_per_prompt}: diversity needs at least 2 images per prompt.")
    pairs = protocol_prompts(identifier, class_noun, live=live, count=prompt_count)
    sampling = dict(seed=seed, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=False)
    images_by_prompt = {}
    for prompt, _ in tqdm(pairs, desc=f"evaluating {name}", disable=not progress):
        images_by_prompt[prompt] = generate(pipeline, prompt, num_images=images_per_prompt, **sampling)
    class_images = generate(
        pipeline, f"a {class_noun}", num_images=class_image_count or 2 * images_per_prompt, **sampling
    )
    return evaluate_images(backbones, images_by_prompt, dict(pairs), class_images, real_images, name=name)


def load_real_images(folder: str | Path) -> list[Image.Image]:
    """The subject's real images, checked the way training checks them (a bad file stops here, named)."""
    from dreambooth_lib.images import check_folder

    report = check_folder(folder, keep_images=True)  # the check decodes each file; keep what it decoded
    report.raise_for_problems()
    return list(report.images.values())


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    backbones: Backbones,
    real_images: Sequence[Image.Image],
    *,
    identifier: str,
    class_noun: str,
    device: torch.device | str | None = None,
    **protocol,
) -> list[EvaluationResult]:
    """Run the protocol on each training run folder (its `pipeline/` or base model + LoRA), named by folder.

    `protocol` takes `evaluate_pipeline`'s keywords (images_per_prompt, prompt_count, seed, ...). Each pipeline is
    freed before the next loads, so only one model sits in memory.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results = []
    for run_dir in map(Path, run_dirs):
        pipeline = load_run_pipeline(run_dir, device=device, dtype=dtype)
        results.append(
            evaluate_pipeline(
                pipeline,
                backbones,
                real_images,
                identifier=identifier,
                class_noun=class_noun,
                name=run_dir.name,
                **protocol,
            )
        )
        del pipeline
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def calibrate(backbones: Backbones, real_images: Sequence[Image.Image]) -> dict[str, float]:
    """DINO and CLIP-I of the real subject images against each other (self-pairs excluded).

    With the full backbones this lands near the paper's "Real Images" row (DINO 0.774, CLIP-I 0.885, averaged over
    its 30 subjects): the ceiling a generated set can reach, and a check that preprocessing and weights are right.
    """
    if len(real_images) < 2:
        raise ValueError("calibration needs at least two real images of the subject.")
    dino = backbones.embed_dino(real_images)
    clip = backbones.embed_clip_images(real_images)
    return {
        "DINO": mean_pairwise_cosine(dino, dino, exclude_self=True),
        "CLIP-I": mean_pairwise_cosine(clip, clip, exclude_self=True),
    }


# --------------------------------------------------------------------------------------------------------------------
# Reading the results


def results_table(results: Sequence[EvaluationResult], *, paper_rows: bool = True) -> str:
    """A Markdown table: our rows, then the paper's reference rows ("-" where the paper has no number)."""
    rows = [(result.name, result.scores) for result in results]
    if paper_rows:
        rows += list(PAPER_ROWS.items())
    arrows = {metric: "↑" if HIGHER_IS_BETTER[metric] else "↓" for metric in METRICS}
    width = max(len(name) for name, _ in rows)
    lines = [
        f"| {'model':<{width}} | " + " | ".join(f"{metric + ' ' + arrows[metric]:>8}" for metric in METRICS) + " |",
        f"| {'-' * width} | " + " | ".join("-" * 8 for _ in METRICS) + " |",
    ]
    for name, scores in rows:
        cells = [f"{scores[metric]:8.3f}" if metric in scores else f"{'-':>8}" for metric in METRICS]
        lines.append(f"| {name:<{width}} | " + " | ".join(cells) + " |")
    notes = {f"DIV of {r.name}: {r.diversity_method}" for r in results}
    notes |= {f"backbones: DINO = {r.dino_model}; CLIP = {r.clip_model}" for r in results}
    return "\n".join(lines + sorted(notes))


def metrics_bar_chart(
    results: Sequence[EvaluationResult],
    *,
    paper_rows: Sequence[str] = ("DreamBooth SD (paper)", "DreamBooth Imagen w/ PPL (paper)"),
):
    """Grouped bars: one group per metric, one bar per run, the named paper rows as hatched bars beside them."""
    import matplotlib.pyplot as plt

    series = [(result.name, result.scores, None) for result in results]
    series += [(name, PAPER_ROWS[name], "//") for name in paper_rows]
    figure, axes = plt.subplots(figsize=(2 + 1.6 * len(METRICS), 3.5))
    width = 0.8 / len(series)
    for index, (name, scores, hatch) in enumerate(series):
        positions = [m + (index - (len(series) - 1) / 2) * width for m in range(len(METRICS))]
        values = [scores.get(metric, math.nan) for metric in METRICS]
        axes.bar(positions, values, width, label=name, hatch=hatch, edgecolor="black" if hatch else None)
    axes.set_xticks(range(len(METRICS)))
    axes.set_xticklabels([f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}" for m in METRICS])
    axes.set_ylabel("score")
    axes.set_title("DreamBooth metrics (↑ higher is better, ↓ lower is better)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def prompt_grid_figure(result: EvaluationResult, *, max_prompts: int | None = None):
    """One row per prompt (its images side by side, the prompt as title), then the bare class prompt's images."""
    import matplotlib.pyplot as plt

    from dreambooth_lib.plots import image_grid

    rows = list(result.images_by_prompt.items())[:max_prompts]
    if result.class_images:
        rows.append(("class prompt (PRES)", result.class_images))
    columns = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), 1, figsize=(2 * columns, 2.2 * len(rows)), squeeze=False)
    for axis, (prompt, images) in zip(axes[:, 0], rows, strict=True):
        axis.imshow(image_grid(images, columns=len(images)))
        axis.set_title(prompt, fontsize=9)
        axis.axis("off")
    figure.tight_layout()
    return figure


def save_results(results: Sequence[EvaluationResult], path: str | Path) -> Path:
    """Write the scores (no images) with the paper's rows as JSON."""
    payload = {"runs": [result.to_dict() for result in results], "paper": PAPER_ROWS}
    return write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False))
