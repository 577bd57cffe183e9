"""The VAE's transient memory without gradients: encoding the latent cache and decoding sampled images.

    python benchmarks/vae_memory.py                  # SD 1.5 at 512 px (fp32) and SDXL at 1024 px (fp16), ~30 s
    python benchmarks/vae_memory.py --json out.json

`dreambooth_lib.memory` adds these tensors to the weights at two moments of a run: while latents are cached (before
the training loop) and while validation images are decoded (after it). The full-size VAE runs on fake tensors
(`FakeTensorMode`: real shapes and dtypes, no arithmetic, no memory), and a dispatch mode follows every tensor an
operation creates until Python frees it, so the peak of the live bytes is what the allocator would have to hold at
once, not counting the weights. Views share their storage and count once. Kernel workspaces are not seen.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dreambooth_lib.models import full_size_components

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_memory import _make_fake, _storage_key  # noqa: E402
from common import RESULTS, argument_parser, machine, write_json  # noqa: E402

GIB = 2**30
CASES = [("sd", 512, torch.float32), ("sdxl", 1024, torch.float16)]  # as train.py runs each family's VAE


class LiveBytes(TorchDispatchMode):
    """The most bytes that the tensors created inside the mode held at one time (storages in `skip` left out)."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip = skip
        self.references: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def _hold(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key in self.skip:
            return
        if key not in self.references:
            self.references[key] = 0
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.now += self.sizes[key]
            self.peak = max(self.peak, self.now)
        self.references[key] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.references[key] -= 1
        if self.references[key] == 0:
            self.now -= self.sizes.pop(key)
            del self.references[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                self._hold(tensor)
        return output


def transient_bytes(kind: str, resolution: int, dtype: torch.dtype) -> dict[str, int]:
    """Peak live bytes of encoding one image and of decoding one latent with the full-size `kind` VAE."""
    vae = full_size_components(kind, device="meta").vae.to(dtype)
    mode = FakeTensorMode()
    _make_fake(vae, mode)
    weights = {_storage_key(tensor) for tensor in [*vae.parameters(), *vae.buffers()]}
    latent = resolution // 8
    peaks = {}
    with mode, torch.no_grad():
        for name, run in {
            "encode": lambda: vae.encode(torch.empty(1, 3, resolution, resolution, dtype=dtype)).latent_dist.std,
            "decode": lambda: vae.decode(torch.empty(1, vae.config.latent_channels, latent, latent, dtype=dtype)),
        }.items():
            live = LiveBytes(weights)
            with live:
                run()
            peaks[name] = live.peak
    return peaks


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__)
    args = parser.parse_args(argv)
    rows = []
    for kind, resolution, dtype in CASES:
        peaks = transient_bytes(kind, resolution, dtype)
        pixel_bytes = resolution**2 * dtype.itemsize
        row = {"kind": kind, "resolution": resolution, "dtype": str(dtype).removeprefix("torch.")}
        for name, peak in peaks.items():
            row[f"{name}_gib_per_image"] = peak / GIB
            row[f"{name}_bytes_per_pixel_byte"] = peak / pixel_bytes
        rows.append(row)
        print(row)
    report = {"machine": machine(), "cases": rows}
    write_json(args.json or RESULTS / "vae_memory.json", report)
    return report


if __name__ == "__main__":
    main()
