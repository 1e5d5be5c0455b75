"""Policy adapter for FLUX.2 [klein] text-to-image (diffusers Flux2KleinPipeline, e.g.
black-forest-labs/FLUX.2-klein-4B).

Everything FLUX.2-specific lives here: one Qwen3 text encoder whose hidden states at three layers
(9, 18, 27 by default) are stacked per token after Qwen3's chat template; latents patchified 2x2
by the VAE into 4x its channels and normalised with the VAE's batch-norm running statistics; 4-axis
RoPE position ids (time, row, column, text position) for image tokens and text tokens; the
empirical, step-count-dependent schedule shift of FLUX.2 (the pipeline module's
compute_empirical_mu); decoding that undoes the normalisation and the patches before the VAE.

Latents: the rollout and the trainer hold them in the pipeline's normalised, patchified space as a
grid [B, 4C, h/2, w/2] (h, w the VAE latent size), whose shape tells the image size. The
transformer reads the grid flattened row by row into [B, h/2 * w/2, 4C] tokens; the prediction is
folded back into the grid.

Guidance, as the stock pipeline does it: the klein checkpoints have no guidance embedding (the
transformer always gets `guidance=None`). A step-distilled checkpoint (`is_distilled` in its
model_index.json, e.g. FLUX.2-klein-4B / 9B) samples without CFG: a guidance scale other than 1.0
is refused. An undistilled base checkpoint (FLUX.2-klein-base-4B / 9B) uses true CFG against the
empty prompt when the scale is above 1: conditional and negative halves run as ONE forward of 2B
rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import Flux2KleinPipeline

from models.base import DiffusersPolicy, ImageSize, PackedLatents, draw_noise
from models.config import ModelConfig

__all__ = ["Flux2KleinConditioning", "Flux2KleinPolicy"]


@dataclass
class Flux2KleinConditioning:
    """P encoded prompts, one row each."""

    prompt_embeds: torch.Tensor  # [P, L, 3D] stacked Qwen3 hidden states, padded to max_sequence_length
    negative_embeds: torch.Tensor | None = None  # [1, L, 3D] the empty prompt's, shared by every row; undistilled checkpoints only (true CFG)

    def take(self, index: torch.Tensor) -> "Flux2KleinConditioning":
        return Flux2KleinConditioning(self.prompt_embeds[index.to(self.prompt_embeds.device)], self.negative_embeds)


class Flux2KleinPolicy(PackedLatents, DiffusersPolicy):
    """models.base.Policy for FLUX.2 [klein] checkpoints.

    Uses config.pretrained / revision / dtype / use_lora / lora / gradient_checkpointing /
    max_sequence_length (Qwen3 tokens of the chat-templated prompt; the stock pipeline's default
    is 512, and longer prompts are cut, as the pipeline cuts them). From PackedLatents it takes the
    image-size checks (`_multiple`, `_grid`) and the schedule, with FLUX.2's own mu; its latents
    stay patchified grids, so the noise is this family's own.
    """

    pipeline_classes = (Flux2KleinPipeline,)
    adapter_name = "flux2_klein"
    example_checkpoint = "black-forest-labs/FLUX.2-klein-4B"

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", *, needs_reference: bool = True):
        pipe = self._load_pipeline(config, device)
        self.pipe = pipe
        self.distilled = bool(pipe.config.is_distilled)
        self._setup_training(needs_reference)

    # ------------------------------------------------------------------ schedule and noise

    def _initial_sigmas(self, num_steps: int):
        """linspace(1, 1/N, N), or None for a scheduler that makes its own (use_flow_sigmas), as
        in the stock __call__."""
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return None
        return super()._initial_sigmas(num_steps)

    def _mu(self, tokens: int, num_steps: int) -> float:
        """FLUX.2's empirical mu (the pipeline module's compute_empirical_mu): it grows with the
        image's token count and depends on the step count too."""
        return self._pipeline_module.compute_empirical_mu(image_seq_len=tokens, num_steps=num_steps)

    def initial_noise(self, generators: Sequence[torch.Generator], size: ImageSize, cond=None) -> torch.Tensor:
        """[B, 4C, rows, cols] float32 noise in the patchified grid, each sample's from its own
        generator: for the same generator, the stock prepare_latents noise before packing."""
        rows, cols = self._grid(size)
        channels = self.network.config.in_channels
        return draw_noise((len(generators), channels, rows, cols), list(generators), device=self.device)

    # ------------------------------------------------------------------ conditioning

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, max_sequence_length=self.config.max_sequence_length)
        return embeds

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], source_images: Sequence | None = None) -> Flux2KleinConditioning:
        """The pipeline's own encode_prompt: each prompt chat-templated, padded to
        max_sequence_length on its own and encoded with its padding masked, so a row does not
        depend on the others. Undistilled checkpoints also keep the empty prompt, CFG's negative."""
        # encode_prompt is not under no_grad by itself; the decorator keeps cached embeddings out
        # of the autograd graph.
        if source_images is not None:
            raise ValueError(f"the {self.adapter_name} adapter is text-to-image and takes no source images (data.train_edits); use data.train_prompts")
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        negative = None if self.distilled else self._encode_text([""])
        return Flux2KleinConditioning(self._encode_text(list(prompts)), negative)

    # ------------------------------------------------------------------ model calls

    def _uses_cfg(self, guidance_scale: float) -> bool:
        """Whether this scale means true CFG; the scales the stock pipeline would ignore are refused."""
        if self.distilled:
            if guidance_scale != 1.0:
                raise ValueError(
                    f"{self.config.pretrained} is step-distilled (is_distilled) and samples without CFG; set "
                    f"sample.guidance_scale and eval.guidance_scale to 1.0 (got {guidance_scale})"
                )
            return False
        if guidance_scale < 1.0:
            raise ValueError(f"guidance scale {guidance_scale}: true CFG needs sample.guidance_scale and eval.guidance_scale >= 1.0")
        return guidance_scale > 1.0

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: Flux2KleinConditioning,
        guidance_scale: float,
        *,
        network: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity [B, 4C, rows, cols] of the latent grid, float32. The grid goes in as tokens
        with the pipeline's position ids; with true CFG the conditional and negative halves are
        ONE forward of 2B rows, combined as negative + scale * (conditional - negative)."""
        network = network if network is not None else self.transformer
        batch, channels, rows, cols = latents.shape
        tokens = self.pipe._pack_latents(latents)  # [B, rows * cols, 4C], row-major
        # The pipeline feeds timestep / 1000 with timestep = 1000 sigma: the model's timestep is sigma.
        timestep = sigma.to(self.device, torch.float32).expand(batch)
        embeds = cond.prompt_embeds
        guided = self._uses_cfg(guidance_scale)
        if guided:
            tokens = torch.cat([tokens, tokens])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([embeds, cond.negative_embeds.expand(batch, -1, -1)])
        # The transformer takes one set of ids for the whole batch: text positions (0, 0, 0, l) and
        # image positions (0, row, column, 0), the pipeline's own.
        text_ids = self.pipe._prepare_text_ids(embeds[:1])[0].to(self.device)
        image_ids = self.pipe._prepare_latent_ids(latents[:1])[0].to(self.device)
        with self._autocast():
            out = network(
                hidden_states=tokens.to(self.compute_dtype),
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=embeds.to(self.compute_dtype),
                txt_ids=text_ids,
                img_ids=image_ids,
                return_dict=False,
            )[0]
        out = out.float()
        if guided:
            conditional, negative = out.chunk(2)
            out = negative + guidance_scale * (conditional - negative)
        return out.permute(0, 2, 1).reshape(batch, channels, rows, cols)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, cond: Flux2KleinConditioning | None = None) -> torch.Tensor:
        """[B, H, W, 3] uint8 images on the CPU from latent grids [B, 4C, rows, cols]: the
        batch-norm statistics restored, the 2x2 patches unfolded, then the VAE decoder."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.float().view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.float().view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        latents = self.pipe._unpatchify_latents(latents.float() * std + mean)  # [B, C, h, w]
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
        images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu()
