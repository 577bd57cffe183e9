"""What training updates, as one module: the UNet with its conditioning, and the text encoder(s) when they are trained.

`Denoiser(noisy_latents, t, prompt)` is the epsilon (or v) prediction of DDPM's loss; `losses.diffusion_loss` calls it.
"""

from __future__ import annotations

import torch

from dreambooth_lib.models import Components
from dreambooth_lib.text import PromptEmbeddings, encode_tokens


class Denoiser(torch.nn.Module):
    """What training updates: the UNet, and the text encoder(s) when they are trained, as one module.

    One module, so that `accelerator.prepare` wraps everything that gets gradients together (one DDP wrapper on
    several processes) and the text encoding runs inside the wrapped forward.
    """

    def __init__(self, components: Components, train_text_encoder: bool):
        super().__init__()
        self.unet = components.unet
        self.text_encoders = torch.nn.ModuleList(components.text_encoders if train_text_encoder else [])
        self.components = components  # a plain attribute: encode_tokens reads tokenizers and encoders from it

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: PromptEmbeddings | list[torch.Tensor],
        time_ids: torch.Tensor | None = None,
        train_text: bool = True,
    ) -> torch.Tensor:
        """The UNet's prediction; `prompt` is cached embeddings, or token ids to encode here (with autograd)."""
        if not isinstance(prompt, PromptEmbeddings):
            with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
                prompt = encode_tokens(self.components, prompt)
        added_conditions = None
        if self.components.kind == "sdxl":
            # SDXL is also conditioned on the pooled text embedding and (original size, crop top-left, target size).
            added_conditions = {"text_embeds": prompt.pooled, "time_ids": time_ids}
        return self.unet(
            noisy_latents, timesteps, encoder_hidden_states=prompt.embeds, added_cond_kwargs=added_conditions
        ).sample


def sdxl_time_ids(resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL's micro-conditioning for one image: original size, crop top-left (0, 0), target size (SDXL paper 2.2)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32, device=device)
