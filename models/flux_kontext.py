"""Policy adapter for FLUX.1 Kontext instruction editing (diffusers FluxKontextPipeline): the
FLUX.1 adapter (models/flux.py) plus the source image's packed latents appended to the noisy
tokens along the sequence, with position ids whose frame coordinate is 1.

Unlike the stock Kontext pipeline, which resizes every source image to one of its preferred ~1 MP
resolutions, the condition is used at the size the caller gives (the training resolution).
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import FluxKontextPipeline

from models.flux import FluxConditioning, FluxPolicy

__all__ = ["FluxKontextPolicy"]


class FluxKontextPolicy(FluxPolicy):
    """models.base.Policy for FLUX.1 Kontext editing checkpoints (e.g.
    black-forest-labs/FLUX.1-Kontext-dev): FluxPolicy plus the source image's latents as a
    second set of tokens. The stock default guidance of Kontext [dev] is 2.5."""

    pipeline_classes = (FluxKontextPipeline,)
    example_checkpoint = "black-forest-labs/FLUX.1-Kontext-dev"
    adapter_name = "flux_kontext"

    def _encode_source(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Packed source latents [S_cond, 4C] of one image and their token grid, as the stock
        pipeline computes them (the VAE posterior's mode, shifted and scaled), at the image's size."""
        pil = self._source_image(image)
        width, height = pil.size
        pixels = self.pipe.image_processor.preprocess(pil, height, width)  # [1, 3, H, W] in [-1, 1]
        latents = self.pipe._encode_vae_image(pixels.to(self.device, self.pipe.vae.dtype), generator=None)
        latent_height, latent_width = latents.shape[2:]
        packed = self.pipe._pack_latents(latents, 1, self._latent_channels, latent_height, latent_width)
        return packed[0], (latent_height // 2, latent_width // 2)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> FluxConditioning:
        """Encode (instruction, source image) pairs; row i belongs to prompts[i]. Each source image
        goes through the VAE on its own, so a row does not depend on the others."""
        if source_images is None:
            raise ValueError("the flux_kontext adapter edits images: pass one source image per instruction (data.train_edits)")
        if len(source_images) != len(prompts):
            raise ValueError(f"got {len(prompts)} instructions but {len(source_images)} source images; pass one image per instruction")
        embeds, pooled = self._encode_text(prompts)
        rows = [self._encode_source(image) for image in source_images]
        grids = {grid for _, grid in rows}
        if len(grids) > 1:
            raise ValueError(f"source images of one batch must share one size, got latent grids {sorted(grids)}")
        return FluxConditioning(embeds, pooled, torch.stack([latents for latents, _ in rows]), grids.pop())
