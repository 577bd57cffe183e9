"""Activation memory of one DreamBooth training step on the full-size UNets: what the forward keeps for backward.

    python benchmarks/activation_memory.py                  # count on this CPU (about three minutes, little memory)
    python benchmarks/activation_memory.py --json out.json  # the same, JSON written elsewhere

The figures calibrate `dreambooth_lib.memory` (activations per image at the family's native resolution, with and
without gradient checkpointing, full fine-tuning and LoRA, 16-bit autocast and fp32).

Method, on a CPU:
- The UNet is the real SD 1.5 / SDXL base 1.0 architecture (`models.full_size_components`), set up exactly as training
  sets it up (`train._set_up_trainable`: fp32 trained weights for full fine-tuning; a 16-bit frozen base with fp32
  adapters for LoRA), fed one image's noisy latents, a timestep and a 77-token prompt embedding (cached, as the loop
  does when the text encoder is frozen).
- Its tensors are *fake* (`FakeTensorMode`): shapes, dtypes and autograd's bookkeeping run as usual, the arithmetic
  does not. So every case is measured at its native resolution (SDXL at 1024 px too) in seconds and with no memory;
  nothing is extrapolated. (Real bf16 arithmetic on a CPU without bf16 instructions runs at about 1 GFLOP/s: one
  SD 1.5 forward would take an hour or more.) A cross-check counts the tiny UNets with real and with fake tensors, in
  every set-up: the byte counts agree exactly.
- A `saved_tensors_hooks` pack hook sees every tensor autograd saves for backward. Distinct storages are summed, so
  views of one storage count once. Parameters are left out (the estimate counts them as weights), and so are
  autocast's 16-bit copies of fp32 trained weights (reported apart: about 2 bytes per trained parameter, which the
  estimate adds separately because it does not grow with images or pixels).
- 16-bit: CPU autocast to bfloat16 stands in for CUDA autocast to float16 (same size). CUDA autocast runs group_norm
  and layer_norm in fp32 where CPU autocast keeps them in 16 bits; the script applies CUDA's rule to both, so the
  counted tensors have the dtypes a GPU would save. Attention is PyTorch's fused SDPA (the CPU flash kernel here, the
  memory-efficient or flash kernel on a GPU): each saves q, k, v, its output and the log-sum-exp, never the
  L x L attention matrix.
- Gradient checkpointing (diffusers' `enable_gradient_checkpointing`: each ResnetBlock2D and BasicTransformerBlock is
  recomputed in backward): the tensors saved with it on, plus the largest block's saved tensors, which exist again
  while that block is recomputed and differentiated.

What the count misses, and the margin put on it: backward also holds the gradient flowing into the node it is
differentiating, the one it produces, and a temporary of like size; the margin is three tensors the size of the
largest saved activation (`TRANSIENT_TENSORS`). Kernel workspaces (cuDNN convolution, attention backward), the CUDA
context and allocator fragmentation are not per-image figures; `MemoryEstimate.fits` keeps 1 GiB of the card free
for them. The text encoders' activations, when they are trained, are measured separately (per prompt, without their
own gradient checkpointing, so an upper bound for runs that turn it on).

With a CUDA GPU the script also measures the real thing: PyTorch's peak allocated memory over one forward and
backward (fp16 autocast) of each case at the native resolution, above the memory held before the step, next to what
the estimate's terms predict for the same step (gradients + weight copies + activations).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth_lib.config import TrainConfig
from dreambooth_lib.denoiser import Denoiser
from dreambooth_lib.models import DEFAULT_MODELS, Components, full_size_components, tiny_components
from dreambooth_lib.text import PromptEmbeddings, tokenize_prompt
from dreambooth_lib.train import _set_up_trainable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, markdown_table, write_json  # noqa: E402

GIB = 2**30
NATIVE_RESOLUTION = {"sd": 512, "sdxl": 1024}
# diffusers checkpoints these modules one by one: backward recomputes one of them at a time.
CHECKPOINTED_BLOCKS = (ResnetBlock2D, BasicTransformerBlock)
# Backward's own tensors at its busiest node: incoming gradient, outgoing gradient, one temporary.
TRANSIENT_TENSORS = 3
PROMPT = "a photo of sks dog"


@dataclass(frozen=True)
class Case:
    """One training set-up whose forward is counted."""

    kind: str
    training: str  # "full" (every UNet weight) or "lora" (adapters on a frozen 16-bit base)
    precision: str  # "16-bit" (autocast) or "fp32"
    resolution: int
    batch: int = 1
    train_text_encoder: bool = False

    def config(self) -> TrainConfig:
        """The TrainConfig that `_set_up_trainable` reads (bf16 on a CPU stands in for fp16 on a GPU)."""
        return TrainConfig(
            kind=self.kind,
            use_lora=self.training == "lora",
            mixed_precision="bf16" if self.precision == "16-bit" else "no",
            train_text_encoder=self.train_text_encoder,
            resolution=self.resolution,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "16-bit" else torch.float32


@dataclass
class Count:
    """What one forward saved for backward, in bytes."""

    saved: int  # distinct storages, without parameters and weight copies
    weight_copies: int  # autocast's 16-bit copies of fp32 trained weights, all held until the forward ends
    largest: int  # the largest single saved storage
    largest_block: int  # the most any one checkpointed block saved


# --------------------------------------------------------------------------------------------------------------------
# Counting


class _WeightCopies(TorchDispatchMode):
    """Notes and holds the copies made of parameters: autocast's 16-bit copies of fp32 trained weights (its cache
    keeps them until the forward ends on a GPU too) and the fp32 casts of 16-bit norm weights.

    Held, a short-lived copy's storage key cannot come back for an activation, which would then be left out.
    """

    def __init__(self, parameters: set[int]):
        super().__init__()
        self.parameters = parameters
        self.copies: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and _storage_key(args[0]) in self.parameters:
            self.copies[_storage_key(output)] = output
        return output


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage under a tensor: its views share it (works for fake tensors, whose data_ptr is 0)."""
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """Records the storages autograd saves during a forward, and which checkpointed block saved each."""

    def __init__(self, module: torch.nn.Module):
        self.parameters = {_storage_key(parameter) for parameter in module.parameters()}
        self.copies = _WeightCopies(self.parameters)
        self.storages: dict[int, tuple[int, str | None]] = {}
        self.held: list[torch.Tensor] = []  # keeps storages alive, so no key is reused while counting
        self._blocks: list[str] = []
        self._handles = [
            handle
            for name, block in module.named_modules()
            if isinstance(block, CHECKPOINTED_BLOCKS)
            for handle in self._track(name, block)
        ]

    def _track(self, name: str, block: torch.nn.Module) -> list:
        def enter(*_):
            self._blocks.append(name)

        def leave(*_):
            self._blocks.pop()

        return [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self.storages:
            self.storages[key] = (tensor.untyped_storage().nbytes(), self._blocks[0] if self._blocks else None)
            self.held.append(tensor)
        return tensor

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor), self.copies:
            yield

    def count(self) -> Count:
        activations = {
            key: value
            for key, value in self.storages.items()
            if key not in self.parameters and key not in self.copies.copies
        }
        per_block: dict[str, int] = {}
        for size, block in activations.values():
            if block is not None:
                per_block[block] = per_block.get(block, 0) + size
        return Count(
            saved=sum(size for size, _ in activations.values()),
            weight_copies=sum(copy.untyped_storage().nbytes() for copy in self.copies.copies.values()),
            largest=max((size for size, _ in activations.values()), default=0),
            largest_block=max(per_block.values(), default=0),
        )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def cuda_autocast_norms() -> Iterator[None]:
    """Run group_norm and layer_norm in fp32 under CPU autocast, as CUDA autocast does (its fp32 op list).

    CPU autocast leaves them in 16 bits; on a GPU their fp32 outputs (and the fp32 input copies they save) are a good
    part of the activations.
    """
    originals = {name: getattr(F, name) for name in ("group_norm", "layer_norm")}

    def in_fp32(function: Callable) -> Callable:
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return function(*args, **kwargs)
            with torch.autocast("cpu", enabled=False):
                return function(*map(_to_fp32, args), **{key: _to_fp32(value) for key, value in kwargs.items()})

        return run

    for name, function in originals.items():
        setattr(F, name, in_fp32(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


def _to_fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


# --------------------------------------------------------------------------------------------------------------------
# Set-up and one forward


def _make_fake(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace a meta module's parameters and buffers with fake CPU tensors of the same shape, dtype and grad flag.

    (`Module.to` cannot move fake tensors: it swaps tensors in place, which the fake mode's weak references forbid.)
    """
    with mode:
        for submodule in module.modules():
            for name, parameter in submodule._parameters.items():
                if parameter is not None:
                    fake = torch.empty(parameter.shape, dtype=parameter.dtype)
                    submodule._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
            for name, buffer in submodule._buffers.items():
                if buffer is not None:
                    submodule._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)


def _inputs(components: Components, case: Case) -> tuple:
    """One batch as the loop feeds the denoiser: noisy latents, timesteps, the prompt, SDXL's size conditioning."""
    side = case.resolution // 8
    latents = torch.randn(case.batch, 4, side, side)
    timesteps = torch.full((case.batch,), 500)
    if case.train_text_encoder:
        prompt = tokenize_prompt(components, [PROMPT] * case.batch)
    else:
        width = components.unet.config.cross_attention_dim
        prompt = PromptEmbeddings(torch.randn(case.batch, 77, width, dtype=case.weight_dtype))
        if components.kind == "sdxl":
            pooled_width = components.text_encoder_2.config.projection_dim
            prompt.pooled = torch.randn(case.batch, pooled_width, dtype=case.weight_dtype)
    time_ids = None
    if components.kind == "sdxl":
        sizes = [case.resolution, case.resolution, 0, 0, case.resolution, case.resolution]
        time_ids = torch.tensor([sizes] * case.batch, dtype=torch.float32)
    return latents, timesteps, prompt, time_ids


def _forward(denoiser: Denoiser, inputs: tuple, case: Case, recorder: SavedTensors) -> None:
    sixteen_bit = case.precision == "16-bit"
    with recorder.recording(), cuda_autocast_norms(), torch.autocast("cpu", torch.bfloat16, enabled=sixteen_bit):
        denoiser(*inputs)


def count_case(case: Case, components: Components | None = None, fake: bool = True) -> tuple[Count, Count]:
    """Count one forward without, then with, gradient checkpointing; full-size components unless given."""
    if components is None:
        components = full_size_components(case.kind, device="meta")
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    _set_up_trainable(components, case.config(), case.weight_dtype, torch.device("meta" if fake else "cpu"))
    if fake:
        for module in (components.unet, *components.text_encoders):
            _make_fake(module, mode)
    denoiser = Denoiser(components, case.train_text_encoder)
    counts = []
    for checkpointing in (False, True):
        if checkpointing:
            components.unet.enable_gradient_checkpointing()
        recorder = SavedTensors(denoiser)
        with mode:
            _forward(denoiser, _inputs(components, case), case, recorder)
        recorder.close()
        counts.append(recorder.count())
    return counts[0], counts[1]


# --------------------------------------------------------------------------------------------------------------------
# The cases and what they tell


def per_image(plain: Count, checkpointed: Count, batch: int) -> dict[str, float]:
    """GiB per image, with the backward margin (and, checkpointed, the block recomputed at once)."""
    transient = TRANSIENT_TENSORS * plain.largest
    return {
        "saved_gib": plain.saved / batch / GIB,
        "transient_gib": transient / batch / GIB,
        "per_image_gib": (plain.saved + transient) / batch / GIB,
        "checkpointed_saved_gib": checkpointed.saved / batch / GIB,
        "recomputed_block_gib": plain.largest_block / batch / GIB,
        "checkpointed_per_image_gib": (checkpointed.saved + plain.largest_block + transient) / batch / GIB,
        "weight_copies_gib": plain.weight_copies / GIB,
    }


def cases() -> list[Case]:
    """Native resolution for every set-up; then resolution and batch steps to show how the figure scales."""
    native = [
        Case(kind, training, precision, NATIVE_RESOLUTION[kind])
        for kind in ("sd", "sdxl")
        for training in ("full", "lora")
        for precision in ("16-bit", "fp32")
    ]
    scaling = [
        Case("sd", "full", "16-bit", 256),
        Case("sd", "full", "16-bit", 768),
        Case("sd", "full", "16-bit", 512, batch=2),
        Case("sdxl", "lora", "16-bit", 512),
        Case("sdxl", "lora", "16-bit", 768),
    ]
    # Trained text encoders: the difference to the same case with cached prompt embeddings.
    text = [Case(kind, "full", "16-bit", NATIVE_RESOLUTION[kind], train_text_encoder=True) for kind in ("sd", "sdxl")]
    return native + scaling + text


def cross_check() -> dict:
    """The tiny UNets counted with real and with fake tensors, in every set-up: the two must agree.

    The real counts at 64 px are also the tiny family's figures in memory.py.
    """
    rows = {}
    for kind in ("sd", "sdxl"):
        for training in ("full", "lora"):
            for precision in ("16-bit", "fp32"):
                case = Case(kind, training, precision, 64)
                real = count_case(case, tiny_components(kind), fake=False)
                fake = count_case(case, tiny_components(kind), fake=True)
                rows[f"tiny {kind} {training} {precision}"] = {
                    "real_bytes": [real[0].saved, real[1].saved],
                    "fake_bytes": [fake[0].saved, fake[1].saved],
                    **per_image(*real, batch=1),
                }
    return rows


def _row(results: list[dict], case: Case) -> dict:
    return next(row for row in results if row["case"] == asdict(case))


def summary(results: list[dict]) -> dict:
    """Per family, the figures memory.py takes: native resolution, one image, cached prompt embeddings."""
    families = {}
    for kind, resolution in NATIVE_RESOLUTION.items():
        figures = {}
        for training in ("full", "lora"):
            sixteen = _row(results, Case(kind, training, "16-bit", resolution))
            fp32 = _row(results, Case(kind, training, "fp32", resolution))
            figures[training] = {
                "per_image_gib": sixteen["per_image_gib"],
                "checkpointed_per_image_gib": sixteen["checkpointed_per_image_gib"],
                "fp32_factor": fp32["per_image_gib"] / sixteen["per_image_gib"],
                "fp32_checkpointed_factor": fp32["checkpointed_per_image_gib"] / sixteen["checkpointed_per_image_gib"],
            }
        cached = _row(results, Case(kind, "full", "16-bit", resolution))
        trained = _row(results, Case(kind, "full", "16-bit", resolution, train_text_encoder=True))
        figures["text_encoder_per_prompt_gib"] = trained["per_image_gib"] - cached["per_image_gib"]
        families[kind] = figures
    return families


def scaling(results: list[dict]) -> list[dict]:
    """Activations per latent pixel (and per image) against the native case: 1.0 means exactly linear."""
    rows = []
    for row in results:
        case = Case(**row["case"])
        if case.train_text_encoder or case.precision != "16-bit":
            continue
        native = Case(case.kind, case.training, case.precision, NATIVE_RESOLUTION[case.kind])
        if case == native:
            continue
        reference = _row(results, native)
        pixels = (case.resolution / native.resolution) ** 2 * case.batch
        rows.append(
            {
                "case": row["case"],
                "relative_to_native": row["saved_gib"] * case.batch / reference["saved_gib"] / pixels,
                "checkpointed_relative_to_native": row["checkpointed_saved_gib"]
                * case.batch
                / reference["checkpointed_saved_gib"]
                / pixels,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# On a CUDA GPU: the real peak of one forward and backward


def cuda_peak(case: Case, checkpointing: bool) -> dict:
    """Peak allocated memory above the weights over one fp16 training step's forward and backward (no optimiser),
    next to the estimate's terms for the same step; None where the card runs out of memory."""
    from dreambooth_lib.memory import estimate_memory_gib

    config = case.config().replace(
        model=DEFAULT_MODELS[case.kind],
        mixed_precision="fp16" if case.precision == "16-bit" else "no",
        gradient_checkpointing=checkpointing,
        with_prior_preservation=False,
    )
    try:
        peak = _cuda_step_peak(case, config) / GIB
    except torch.cuda.OutOfMemoryError:
        peak = None
    torch.cuda.empty_cache()
    estimate = estimate_memory_gib(config)
    return {
        "case": asdict(case),
        "gradient_checkpointing": checkpointing,
        "peak_above_weights_gib": peak,
        "estimated_gib": estimate.gradients + estimate.weight_copies + estimate.activations,
    }


def _cuda_step_peak(case: Case, config: TrainConfig) -> int:
    device = torch.device("cuda")
    weight_dtype = torch.float16 if case.precision == "16-bit" else torch.float32
    # LoRA's base is 16-bit anyway: build it so, rather than in fp32 and cast.
    components = full_size_components(case.kind, device=device, dtype=weight_dtype if config.use_lora else None)
    _set_up_trainable(components, config, weight_dtype, device)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    denoiser = Denoiser(components, False)
    with torch.device(device):
        latents, timesteps, prompt, time_ids = _inputs(components, case)
    prompt = prompt.to(device, weight_dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", torch.float16, enabled=case.precision == "16-bit"):
        prediction = denoiser(latents, timesteps, prompt, time_ids)
    F.mse_loss(prediction.float(), torch.randn_like(prediction, dtype=torch.float32)).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# --------------------------------------------------------------------------------------------------------------------


def _table(results: list[dict]) -> str:
    header = [
        "model",
        "training",
        "precision",
        "px",
        "batch",
        "text enc.",
        "saved",
        "+ margin",
        "checkpointed",
        "copies",
    ]
    rows = []
    for row in results:
        case = row["case"]
        rows.append(
            [
                case["kind"],
                case["training"],
                case["precision"],
                str(case["resolution"]),
                str(case["batch"]),
                "trained" if case["train_text_encoder"] else "cached",
                f"{row['saved_gib'] * case['batch']:.3f}",
                f"{row['per_image_gib'] * case['batch']:.3f}",
                f"{row['checkpointed_per_image_gib'] * case['batch']:.3f}",
                f"{row['weight_copies_gib']:.3f}",
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=RESULTS / "activation_memory.json", help="where to write results")
    args = parser.parse_args(argv)

    started = time.time()
    results = []
    for case in cases():
        plain, checkpointed = count_case(case)
        results.append({"case": asdict(case), **per_image(plain, checkpointed, case.batch)})
        print(f"counted {case} ({time.time() - started:.0f} s)", flush=True)
    payload = {
        "machine": machine(),
        "method": "saved-tensor count of one forward with fake tensors (see the script's docstring); GiB",
        "transient_tensors": TRANSIENT_TENSORS,
        "measured": "every case at its own resolution; nothing extrapolated",
        "results": results,
        "scaling": scaling(results),
        "summary": summary(results),
        "cross_check_tiny_real_vs_fake": cross_check(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        native = [
            Case(kind, training, "16-bit", NATIVE_RESOLUTION[kind])
            for kind in ("sd", "sdxl")
            for training in ("full", "lora")
        ]
        payload["cuda"] = [cuda_peak(case, checkpointing) for case in native for checkpointing in (False, True)]

    print()
    print("Every case was counted at its own resolution and batch (fake tensors): nothing is extrapolated.")
    print(
        "Saved for backward, GiB (one image per batch entry; '+ margin' adds backward's transient tensors; "
        "'checkpointed' includes the block recomputed at once; 'copies' = autocast's 16-bit weight copies):"
    )
    print(_table(results))
    print("\nScaling against the native resolution, per latent pixel and image (1.00 = linear):")
    for row in payload["scaling"]:
        case = row["case"]
        print(
            f"  {case['kind']} {case['training']} {case['resolution']} px x{case['batch']}: "
            f"{row['relative_to_native']:.3f} (checkpointed {row['checkpointed_relative_to_native']:.3f})"
        )
    print("\nPer family at the native resolution, GiB per image with the margin (memory.py's inputs):")
    for kind, figures in payload["summary"].items():
        modes = ", ".join(
            f"{training} {figures[training]['per_image_gib']:.2f} (checkpointed "
            f"{figures[training]['checkpointed_per_image_gib']:.2f}; fp32 x{figures[training]['fp32_factor']:.2f} / "
            f"x{figures[training]['fp32_checkpointed_factor']:.2f})"
            for training in ("full", "lora")
        )
        print(f"  {kind}: {modes}; trained text encoders {figures['text_encoder_per_prompt_gib']:.3f} per prompt")
    print("\nCross-check, tiny UNets at 64 px, bytes saved without / with checkpointing, real and fake tensors:")
    for name, row in payload["cross_check_tiny_real_vs_fake"].items():
        agree = "agree" if row["real_bytes"] == row["fake_bytes"] else "DIFFER"
        print(f"  {name}: real {row['real_bytes']}, fake {row['fake_bytes']}: {agree}")
    if payload["cuda"]:
        print("\nCUDA peak above the weights over forward + backward, GiB, against the estimate's terms:")
        for row in payload["cuda"]:
            print(f"  {row}")
    print(f"\n{time.time() - started:.0f} s")
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
