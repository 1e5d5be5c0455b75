"""Policy adapter for FLUX.1 [dev] text-to-image (diffusers FluxPipeline); FLUX.1 Kontext
instruction editing (FluxKontextPipeline) is its subclass in models/flux_kontext.py.

Everything FLUX.1-specific lives in these two files; here: the pooled CLIP embedding next to the T5 token embeddings,
packed 2x2 latents with their (frame, row, column) position ids and all-zero text ids, the
guidance *embedding* of the guidance-distilled checkpoints, the dynamic (resolution-dependent)
shift of the sigma schedule, and the VAE's scaling and shift factors; velocity also reads a
Kontext condition's source tokens when the conditioning carries them.

Guidance: FLUX.1 [dev] and Kontext [dev] are guidance-distilled. There is no negative prompt and
no second forward; the transformer reads the guidance scale as an input (`guidance`), so
`velocity(..., guidance_scale)` is always ONE forward of B rows, whatever the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import FluxPipeline

from models.base import DiffusersPolicy, PackedLatents
from models.config import ModelConfig

__all__ = ["FluxConditioning", "FluxPolicy"]

# The stock pipelines refuse longer T5 prompts (FLUX.1 was trained with at most 512 tokens).
MAX_T5_TOKENS = 512


@dataclass
class FluxConditioning:
    """P encoded prompts (Kontext: instructions with their source images), one row each."""

    prompt_embeds: torch.Tensor  # [P, L, D] T5 token embeddings, padded to max_sequence_length
    pooled_embeds: torch.Tensor  # [P, Dp] pooled CLIP embeddings
    image_latents: torch.Tensor | None = None  # Kontext: [P, S_cond, 4C] packed, normalised source latents; None for text-to-image
    image_grid: tuple[int, int] | None = None  # Kontext: (rows, cols) of the packed source token grid; S_cond = rows * cols

    def take(self, index: torch.Tensor) -> "FluxConditioning":
        index = index.to(self.prompt_embeds.device)
        image_latents = None if self.image_latents is None else self.image_latents[index]
        return FluxConditioning(self.prompt_embeds[index], self.pooled_embeds[index], image_latents, self.image_grid)


class FluxPolicy(PackedLatents, DiffusersPolicy):
    """models.base.Policy for FLUX.1 text-to-image checkpoints (e.g. black-forest-labs/FLUX.1-dev).

    Uses config.pretrained / revision / dtype / use_lora / lora / gradient_checkpointing /
    max_sequence_length (T5 tokens, at most 512). The guidance scale the trainer passes is the
    value of the guidance embedding (FLUX.1 [dev]'s default is 3.5), not a CFG weight.
    """

    pipeline_classes = (FluxPipeline,)
    example_checkpoint = "black-forest-labs/FLUX.1-dev"
    adapter_name = "flux"
    # The guidance scale is an input of the network, not a CFG weight: forward-process objectives
    # (nft, awm) train at the scale the rollouts sample with, as FIRM trains Kontext at 2.5.
    embedded_guidance = True

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        if config.max_sequence_length > MAX_T5_TOKENS:
            raise ValueError(f"model.max_sequence_length {config.max_sequence_length}: FLUX.1 takes at most {MAX_T5_TOKENS} T5 tokens")
        pipe = self._load_pipeline(config, device)
        self.pipe = pipe
        self._setup_training(needs_reference)

    # ------------------------------------------------------------------ position ids

    def _image_ids(self, rows: int, cols: int, frame: int) -> torch.Tensor:
        """[rows * cols, 3] RoPE ids (frame, row, column) of a packed token grid, the pipeline's own."""
        ids = self.pipe._prepare_latent_image_ids(1, rows, cols, self.device, torch.float32)
        ids[:, 0] = frame
        return ids

    # ------------------------------------------------------------------ conditioning

    def _encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 token embeddings [P, L, D] and pooled CLIP embeddings [P, Dp], the pipeline's own
        encoding (both padded to fixed lengths without masks, so a row does not depend on the
        others)."""
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.config.max_sequence_length
        )
        return embeds, pooled

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> FluxConditioning:
        # encode_prompt is not under no_grad by itself; the decorator keeps cached embeddings out
        # of the autograd graph.
        if source_images is not None:
            raise ValueError("the flux adapter is text-to-image and takes no source images; use model.adapter=flux_kontext for editing data")
        return FluxConditioning(*self._encode_text(prompts))

    # ------------------------------------------------------------------ model calls

    def _guidance(self, guidance_scale: float, batch: int) -> torch.Tensor | None:
        if self.network.config.guidance_embeds:
            return torch.full((batch,), float(guidance_scale), device=self.device, dtype=torch.float32)
        if guidance_scale != 1.0:
            raise ValueError(
                f"{self.config.pretrained} has no guidance embedding (e.g. FLUX.1 [schnell]) and this adapter "
                f"has no true CFG; set sample.guidance_scale and eval.guidance_scale to 1.0 (got {guidance_scale})"
            )
        return None

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: FluxConditioning,
        guidance_scale: float,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity [B, C, h, w] of the (unpacked) latents, float32: one forward, the guidance
        scale embedded. The latents go in as packed tokens; with a Kontext condition the
        transformer reads them followed by the source image's (frame 1 of the RoPE ids) and
        predicts for all; only the noisy image's tokens are kept and unpacked."""
        network = network if network is not None else self.transformer
        batch = latents.shape[0]
        tokens, (rows, cols) = self._pack(latents)
        seq = tokens.shape[1]
        # The pipeline feeds timestep / 1000 with timestep = 1000 sigma: the model's timestep is sigma.
        timestep = sigma.to(self.device, torch.float32).expand(batch)
        hidden = tokens.to(self.compute_dtype)
        image_ids = self._image_ids(rows, cols, frame=0)
        if cond.image_latents is not None:
            hidden = torch.cat([hidden, cond.image_latents.to(self.compute_dtype)], dim=1)
            image_ids = torch.cat([image_ids, self._image_ids(*cond.image_grid, frame=1)])
        text_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=self.device, dtype=torch.float32)
        with self._autocast():
            out = network(
                hidden_states=hidden,
                timestep=timestep,
                guidance=self._guidance(guidance_scale, batch),
                pooled_projections=cond.pooled_embeds.to(self.compute_dtype),
                encoder_hidden_states=cond.prompt_embeds.to(self.compute_dtype),
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        return self._unpack(out[:, :seq].float(), rows, cols)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: FluxConditioning | None = None) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU from latents [B, C, h, w]."""
        vae = self.pipe.vae
        latents = latents.float() / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
